"""The bundled SmolLM2-135M-Instruct through the real server and the official openai client."""

from __future__ import annotations

import openai
import pytest

from tests.api.conftest import serve_node

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("dtype", ["float32", "auto"])
async def test_smollm2_knows_the_capital_of_france(smollm2_dir, dtype):
    async with serve_node(smollm2_dir, served_model_name=None, dtype=dtype, num_kv_blocks=64) as node:
        name = node.engine.model_name
        assert name == "SmolLM2-135M-Instruct"
        async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0) as client:
            answer = await client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=24)
            assert "Paris" in answer.choices[0].message.content
            assert answer.choices[0].finish_reason == "stop"
            stream = await client.chat.completions.create(
                model=name, messages=QUESTION, temperature=0, max_tokens=24, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            assert text == answer.choices[0].message.content
            assert usage.completion_tokens == answer.usage.completion_tokens
