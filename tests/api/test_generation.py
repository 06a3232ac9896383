"""Chat and text completions through the official `openai` client against a real node."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import MODEL

pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France is"}]
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def test_chat_completion(client: openai.AsyncOpenAI, tokenizer):
    resp = await client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    [choice] = resp.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert resp.usage.prompt_tokens == prompt_tokens
    assert 1 <= resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == prompt_tokens + resp.usage.completion_tokens


async def test_chat_stream_assembles_to_the_non_streaming_answer(client: openai.AsyncOpenAI):
    whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_stream_without_usage_has_no_usage_chunk(client: openai.AsyncOpenAI):
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **GREEDY)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices and c.usage is None for c in chunks)


async def test_completion_and_its_stream(client: openai.AsyncOpenAI):
    whole = await client.completions.create(model=MODEL, prompt="The capital of Italy", **GREEDY)
    assert whole.object == "text_completion"
    [choice] = whole.choices
    assert choice.finish_reason in ("stop", "length")
    stream = await client.completions.create(
        model=MODEL, prompt="The capital of Italy", stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


async def test_completion_prompt_as_token_ids(client: openai.AsyncOpenAI, tokenizer):
    ids = tokenizer.encode("The capital of Italy")
    by_text = await client.completions.create(model=MODEL, prompt="The capital of Italy", **GREEDY)
    by_ids = await client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text


async def test_max_tokens_and_max_completion_tokens(client: openai.AsyncOpenAI):
    exact = {"ignore_eos": True}
    resp = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7, extra_body=exact)
    assert resp.usage.completion_tokens == 7 and resp.choices[0].finish_reason == "length"
    resp = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, max_completion_tokens=5, extra_body=exact
    )
    assert resp.usage.completion_tokens == 5
    resp = await client.completions.create(model=MODEL, prompt="Hello", extra_body=exact)
    assert resp.usage.completion_tokens == 16  # the node's default_max_tokens


async def test_stop_strings_cut_the_output(client: openai.AsyncOpenAI):
    full = await client.completions.create(
        model=MODEL, prompt="Hello world", extra_body={"ignore_eos": True}, **GREEDY
    )
    text = full.choices[0].text
    assert len(text) >= 6
    stop = text[3:5]
    expected = text[: text.index(stop)]
    for stop_param in (stop, ["\x00never", stop]):
        resp = await client.completions.create(model=MODEL, prompt="Hello world", stop=stop_param, **GREEDY)
        assert resp.choices[0].text == expected
        assert resp.choices[0].finish_reason == "stop"


async def test_seed_makes_sampling_reproducible(client: openai.AsyncOpenAI):
    async def sample(seed: int) -> str:
        resp = await client.completions.create(
            model=MODEL, prompt="Numbers", temperature=1.0, top_p=0.95, seed=seed, max_tokens=16,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return resp.choices[0].text

    first = await sample(1)
    assert await sample(1) == first
    assert {await sample(s) for s in (2, 3, 4)} - {first}  # other seeds give other text


async def test_top_k_one_is_greedy(client: openai.AsyncOpenAI):
    greedy = await client.completions.create(model=MODEL, prompt="Hello", **GREEDY)
    top1 = await client.completions.create(
        model=MODEL, prompt="Hello", temperature=1.0, max_tokens=24, seed=7, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy.choices[0].text


async def test_text_content_parts_and_developer_role(client: openai.AsyncOpenAI):
    as_parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        MESSAGES[1],
    ]
    as_system = [{"role": "system", "content": "Be brief."}, MESSAGES[1]]
    a = await client.chat.completions.create(model=MODEL, messages=as_parts, **GREEDY)
    b = await client.chat.completions.create(model=MODEL, messages=as_system, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


async def test_unknown_fields_are_ignored_and_n_1_is_accepted(client: openai.AsyncOpenAI):
    resp = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=1, user="someone", extra_body={"logit_bias": {}, "x_future_field": [1]},
        **GREEDY,
    )  # fmt: skip
    assert len(resp.choices) == 1


async def test_models(client: openai.AsyncOpenAI):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"
