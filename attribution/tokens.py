"""The prompt's token count a payer signs as `inputTokens`, computed exactly as the node tokenizes.

The node (node/api/generation.py) turns a chat body into the base model's chat template with a
generation prompt and encodes the rendered text without adding special tokens (the template wrote
them); a completion's string prompt goes through the tokenizer's plain `encode`, and a token-id prompt
is counted as is. `InputTokenCounter` does the same with the same tokenizer directory, so the count the
payer signs equals the node's (tests/attribution/test_tokens.py compares them body by body).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from attribution.errors import RequestBuildError


def chat_conversation(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as the chat template takes them: content parts joined into one string,
    "developer" (OpenAI's newer name) as "system", `name` kept when given."""
    conversation = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str):
            content = "".join(part["text"] for part in content or ())
        role = m["role"]
        message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("name") is not None:
            message["name"] = m["name"]
        conversation.append(message)
    return conversation


class InputTokenCounter:
    """Counts a request body's prompt tokens with a base model's tokenizer and chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InputTokenCounter:
        """Loads the tokenizer of a local Hugging Face model directory (the node's base model)."""
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(path)))
        except (OSError, ValueError) as exc:
            raise RequestBuildError(f"cannot load a tokenizer from {path}: {exc}") from exc

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Tokens of the chat template rendered over `messages` with the assistant's generation prompt."""
        if self.tokenizer.chat_template is None:
            raise RequestBuildError("this tokenizer has no chat template; use completions")
        try:
            ids = self.tokenizer.apply_chat_template(
                chat_conversation(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except (KeyError, TypeError) as exc:
            raise RequestBuildError(f"malformed chat messages: {exc}") from exc
        except jinja2.TemplateError as exc:  # the template's own raise_exception(), or a syntax error
            raise RequestBuildError(f"the chat template rejected these messages: {exc}") from exc
        return len(ids)

    def completion(self, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]) -> int:
        """Tokens of a completion prompt: a string, token ids, or a list holding exactly one of those."""
        if isinstance(prompt, list | tuple) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise RequestBuildError("only one prompt per request is supported")
            prompt = prompt[0]
        count = len(self.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
        if count == 0:
            raise RequestBuildError("the prompt is empty")
        return count

    def count(self, body: Mapping[str, Any]) -> int:
        """The body's input tokens: `messages` for a chat body, `prompt` for a completion body."""
        if "messages" in body:
            return self.chat(body["messages"])
        if "prompt" in body:
            return self.completion(body["prompt"])
        raise RequestBuildError("a request body needs 'messages' (chat) or 'prompt' (completions)")
