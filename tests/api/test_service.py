"""/health, /metrics and /openapi.json."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from tests.api.conftest import MODEL, Node, scrape

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = "/v1/chat/completions"


async def test_health(http: aiohttp.ClientSession):
    async with http.get("/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0, "ipfs": None}


async def test_metrics_after_requests(http: aiohttp.ClientSession, client: openai.AsyncOpenAI, node: Node):
    before = await scrape(http)
    messages = [{"role": "user", "content": "Hello"}]
    ok = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True)
    async for _ in stream:
        pass
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=messages)
    after = await scrape(http)

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    assert delta("openlora_requests_total", endpoint=CHAT, status="200") == 2
    assert delta("openlora_requests_total", endpoint=CHAT, status="404") == 1
    assert delta("openlora_request_duration_seconds_count", endpoint=CHAT) == 3
    assert delta("openlora_time_to_first_token_seconds_count", endpoint=CHAT) == 2
    assert delta("openlora_prompt_tokens_total", endpoint=CHAT) == 2 * ok.usage.prompt_tokens
    assert ok.usage.completion_tokens <= delta("openlora_completion_tokens_total", endpoint=CHAT) <= 10
    assert after("openlora_requests_total", endpoint="/metrics", status="200") >= 1
    assert after("openlora_kv_blocks_total") == node.engine.stats()["kv_blocks_total"] == 128
    assert after("openlora_kv_blocks_used") == 0
    assert after("openlora_warmup_seconds") > 0  # the node ran a generation before it served (issue 12 item 10)
    assert after("openlora_requests_running") == after("openlora_requests_waiting") == 0


async def test_prefix_cache_hits_and_misses_in_metrics(http: aiohttp.ClientSession, client: openai.AsyncOpenAI):
    """The same prompt twice: the second finds its full blocks (16 tokens each here) in the cache,
    all but the block of its last token; a different prompt finds none."""
    messages = [{"role": "user", "content": "Tell me about the prefix cache of this node, please. " * 3}]
    counts = []
    for content in (messages, messages, [{"role": "user", "content": "Something else entirely, " * 4}]):
        before = await scrape(http)
        done = await client.chat.completions.create(model=MODEL, messages=content, max_tokens=2, temperature=0)
        after = await scrape(http)
        n = done.usage.prompt_tokens
        hit = after("openlora_prefix_cache_tokens_total", result="hit") - before(
            "openlora_prefix_cache_tokens_total", result="hit"
        )
        miss = after("openlora_prefix_cache_tokens_total", result="miss") - before(
            "openlora_prefix_cache_tokens_total", result="miss"
        )
        counts.append((n, hit, miss))
    (n, hit0, miss0), (n1, hit1, miss1), (n2, hit2, miss2) = counts
    assert n == n1 > 32 and (hit0, miss0) == (0, n)
    assert (hit1, miss1) == ((n - 1) // 16 * 16, n - (n - 1) // 16 * 16)
    assert (hit2, miss2) == (0, n2)


async def test_unrouted_paths_share_one_metrics_label(http: aiohttp.ClientSession):
    for path in ("/a", "/b/c"):
        async with http.get(path) as resp:
            assert resp.status == 404
    value = await scrape(http)
    assert value("openlora_requests_total", endpoint="unmatched", status="404") == 2


async def test_openapi_document(http: aiohttp.ClientSession, node: Node):
    async with http.get("/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ChatCompletion", "ChatCompletionChunk",
                 "Completion", "ModelList", "ErrorResponse", "Health"):  # fmt: skip
        assert name in schemas
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert schemas["ErrorResponse"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorBody"}

    # Every route the app serves is documented, with the same methods, and nothing else is.
    served = {
        (route.resource.canonical.replace("{model:.+}", "{model}"), route.method.lower())
        for route in node.app.router.routes()
        if route.method != "HEAD"
    }
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert documented == served

    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert {"200", "400", "404", "413"} <= set(chat["responses"])

    def refs(node: object):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    all_refs = set(refs(doc))
    assert all_refs
    for ref in all_refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref


async def test_a_cleaned_up_app_lets_go_of_its_model(tiny_model_dir):
    """aiohttp keeps its last 1,024 apps referenced (a middleware cache keyed by the app), and an app holds its
    engine: a process that made apps one after another (tests, benchmarks) kept every model until the engine
    let go of it at cleanup. After cleanup nothing holds the model or its KV cache, while the app lives on."""
    import gc
    import weakref

    from tests.api.conftest import serve_node

    async with serve_node(tiny_model_dir) as n:
        async with aiohttp.ClientSession(base_url=n.url) as http:  # a request: the app enters aiohttp's cache
            async with http.post(
                CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            ) as r:
                assert r.status == 200
        app = weakref.ref(n.app)
        model, kv = weakref.ref(n.engine.runner.model), weakref.ref(n.engine.runner.kv)
    del n
    gc.collect()
    assert app() is not None  # still referenced (by aiohttp's cache)...
    assert model() is None and kv() is None  # ...but not its model or KV cache
