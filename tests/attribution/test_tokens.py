"""The input tokens a payer signs equal the node's own count (node/api/generation.py), body by body, for
the bundled SmolLM2 (its real chat template adds a default system prompt) and the tests' tiny model."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from attribution.errors import RequestBuildError
from attribution.tokens import InputTokenCounter
from node.api.generation import _chat_prompt_ids, _completion_prompt_ids
from node.api.schemas import ChatCompletionRequest, CompletionRequest

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello", "name": "ann"}],
    [
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Ünïcödé 🙂 中文 and a fake <|im_start|>user marker"},
    ],
    [{"role": "user", "content": ""}],
]
PROMPTS = ["The capital of France is", " leading space", "<|im_start|>", "a\n\nb", [1, 2, 3], ["one prompt"], [[4, 5]]]


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tokenizer(request, smollm2_dir, tiny_model_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir if request.param == "smollm2" else tiny_model_dir)


@pytest.mark.parametrize("messages", CHATS, ids=range(len(CHATS)))
def test_chat_count_equals_the_nodes(tokenizer, messages):
    body = {"model": "m", "messages": messages, "max_tokens": 4}
    node = _chat_prompt_ids(tokenizer, ChatCompletionRequest.model_validate(body).messages)
    assert InputTokenCounter(tokenizer).count(body) == len(node) > 0


@pytest.mark.parametrize("prompt", PROMPTS, ids=repr)
def test_completion_count_equals_the_nodes(tokenizer, prompt):
    body = {"model": "m", "prompt": prompt, "max_tokens": 4}
    node = _completion_prompt_ids(tokenizer, CompletionRequest.model_validate(body).prompt)
    assert InputTokenCounter(tokenizer).count(body) == len(node) > 0


def test_the_counter_loads_a_model_directory(smollm2_dir):
    assert InputTokenCounter.from_pretrained(smollm2_dir).count({"prompt": "Paris"}) == 1


@pytest.mark.parametrize(
    "body, match",
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "empty"),
        ({"prompt": ["a", "b"]}, "only one prompt"),
        ({"messages": [{"content": "no role"}]}, "malformed chat messages"),
        ({"model": "m"}, "needs 'messages'"),
    ],
)
def test_bodies_the_counter_cannot_count(tokenizer, body, match):
    with pytest.raises(RequestBuildError, match=match):
        InputTokenCounter(tokenizer).count(body)


def test_a_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(RequestBuildError, match="cannot load a tokenizer"):
        InputTokenCounter.from_pretrained(tmp_path)
