"""Adapters through the API: listed as models, selected by `model`, mixed with base requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from node.adapters.synthetic import make_random_adapter
from node.api.keys import LOOKUPS
from tests.api.conftest import MODEL, Node, serve_node

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADAPTERS = ("alpha", "beta")
GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api-adapters")
    for seed, name in enumerate(ADAPTERS):
        make_random_adapter(tiny_model_dir, root / name, rank=4, seed=seed, std=0.3)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(tiny_model_dir, adapters_dir) -> AsyncIterator[Node]:  # overrides conftest's: with adapters
    async with serve_node(tiny_model_dir, adapters_dir=str(adapters_dir)) as n:
        yield n


async def test_adapters_are_listed_after_the_base_model(client: openai.AsyncOpenAI):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL, *ADAPTERS]
    assert (await client.models.retrieve("beta")).id == "beta"


async def test_each_adapter_changes_the_answer_and_batches_mix(client: openai.AsyncOpenAI, node: Node):
    async def complete(model: str) -> str:
        resp = await client.completions.create(model=model, prompt="The capital of France", **GREEDY)
        assert resp.model == model
        return resp.choices[0].text

    alone = {model: await complete(model) for model in (MODEL, *ADAPTERS)}
    assert len(set(alone.values())) == 3  # the adapters really apply
    mixed = await asyncio.gather(*(complete(model) for model in (MODEL, *ADAPTERS) * 2))
    assert mixed == [alone[m] for m in (MODEL, *ADAPTERS) * 2]
    await node.wait_idle()


async def test_unknown_adapter_is_model_not_found(client: openai.AsyncOpenAI):
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}])
    assert (info.value.code, info.value.param) == ("model_not_found", "model")


async def test_public_lookups_of_new_names_are_rate_limited(tiny_model_dir, adapters_dir):
    """GET /v1/models/<name> is public: names no source on this machine has draw from one bucket (1/s, burst 4
    here), an empty one answers 429 with Retry-After; the operator's own adapters and the base model never draw."""
    async with serve_node(tiny_model_dir, adapters_dir=str(adapters_dir), model_lookups_per_s=1) as n:
        # The bucket's clock stands still: on the wall clock, a loaded machine taking a second over these
        # lookups would refill a token before the one that must be refused.
        limiter = n.app[LOOKUPS]
        now = limiter.clock()
        limiter.clock = lambda: now
        async with openai.AsyncOpenAI(base_url=f"{n.url}/v1", api_key="x", max_retries=0) as client:
            assert (await client.models.retrieve("alpha")).id == "alpha"  # on local disk: no token
            for i in range(4):  # the burst
                with pytest.raises(openai.NotFoundError):
                    await client.models.retrieve(f"fresh-{i}")
            with pytest.raises(openai.RateLimitError) as info:
                await client.models.retrieve("fresh-4")
            assert info.value.code == "rate_limit_exceeded"
            assert int(info.value.response.headers["Retry-After"]) >= 1
            assert (await client.models.retrieve("alpha")).id == "alpha"
            assert (await client.models.retrieve(MODEL)).id == MODEL  # the base model: never limited
