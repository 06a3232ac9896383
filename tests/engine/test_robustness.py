"""Hostile sampling parameters never kill the engine; if the engine thread does stop, nobody waits
forever and new requests are refused at once."""

from __future__ import annotations

import asyncio

import pytest
import torch

from node.config import Settings
from node.engine import AsyncEngine, EngineStoppedError, GenerationRequest, SamplingParams
from node.engine.sampling import make_generator, sample


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-40, seed=1),
        SamplingParams(temperature=1.0, top_p=1e-300, seed=1),
        SamplingParams(temperature=1e-6, top_p=1e-300, top_k=1, seed=1),
        SamplingParams(temperature=1e6, seed=1),
    ],
)
def test_extreme_sampling_parameters_give_a_token(params):
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)) * 30
    token = sample(logits, [params], [make_generator(params)])[0]
    assert 0 <= token < 100
    if params.temperature < 1e-5 or params.top_p < 1e-100:
        assert token == int(logits.argmax())


def test_non_finite_logits_fall_back_to_greedy():
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    p = SamplingParams(temperature=1.0, seed=0)
    assert sample(logits, [p], [make_generator(p)]) in ([2], [1])


async def test_engine_death_ends_every_waiter_and_refuses_new_work(tiny_model_dir):
    engine = AsyncEngine.load(Settings(model=str(tiny_model_dir), kv_block_size=4))
    await engine.start()
    boom = RuntimeError("simulated kernel failure")

    def failing_forward(*args, **kwargs):
        raise boom

    engine.runner.model.forward = failing_forward
    sp = SamplingParams(max_tokens=5, temperature=0)

    async def run(i: int) -> None:
        async for _ in engine.generate(GenerationRequest(f"d{i}", [5, 6, 7], sp)):
            pass

    results = await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(3)), return_exceptions=True), 10)
    assert all(isinstance(r, EngineStoppedError) for r in results)
    assert not engine.healthy and engine.runner.error is boom
    with pytest.raises(EngineStoppedError):
        await run(9)
    await engine.stop()
