"""The OpenAPI 3.1 document, generated from the wire schemas (OpenAPI 3.1 schemas are JSON Schema 2020-12,
which is what pydantic emits)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from node.api import schemas

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid request (malformed JSON, wrong field type or value, prompt too long)",
        404: "Unknown model",
        413: "Request body too large",
        503: "The engine could not serve the request",
    }
    return {str(s): _json(schemas.ErrorResponse, reasons[s]) for s in statuses}


def _generation(request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel], summary: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": (
                        f"A {response.__name__}; with `stream: true`, server-sent events: each `data:` line "
                        f"holds a {chunk.__name__}, the last one is `data: [DONE]`"
                    ),
                    "content": {
                        "application/json": {"schema": _ref(response)},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors(400, 404, 413, 503),
            },
        }
    }


def build_openapi() -> dict[str, Any]:
    _, top = models_json_schema(
        [
            (schemas.ChatCompletionRequest, "validation"),
            (schemas.CompletionRequest, "validation"),
            (schemas.ChatCompletion, "serialization"),
            (schemas.ChatCompletionChunk, "serialization"),
            (schemas.Completion, "serialization"),
            (schemas.ModelList, "serialization"),
            (schemas.Health, "serialization"),
            (schemas.AttributionInfo, "serialization"),
            (schemas.PayerPosition, "serialization"),
            (schemas.ErrorResponse, "serialization"),
        ],
        ref_template=_REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "OpenLoRA Node", "version": "0.1.0", "description": "OpenAI-compatible inference API."},
        "paths": {
            "/v1/chat/completions": _generation(
                schemas.ChatCompletionRequest, schemas.ChatCompletion, schemas.ChatCompletionChunk, "Chat completion"
            ),
            "/v1/completions": _generation(
                schemas.CompletionRequest, schemas.Completion, schemas.Completion, "Text completion"
            ),
            "/v1/models": {
                "get": {"summary": "Served models", "responses": {"200": _json(schemas.ModelList, "Models")}}
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One served model",
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _json(schemas.ModelCard, "The model"), **_errors(404)},
                }
            },
            "/v1/attribution": {
                "get": {
                    "summary": "What a dApp signs for this node (chain-backed nodes only; docs/dapp.md)",
                    "responses": {
                        "200": _json(schemas.AttributionInfo, "The EIP-712 domain, node, record signer, limits"),
                        "404": _json(schemas.ErrorResponse, "This node has no chain: requests are unsigned and free"),
                        "503": _json(schemas.ErrorResponse, "The chain cannot be read right now"),
                    },
                }
            },
            "/v1/attribution/payers/{payer}": {
                "get": {
                    "summary": "A payer's position with this node: sign above cumulativeCap",
                    "parameters": [{"name": "payer", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json(schemas.PayerPosition, "Highest interval end seen, escrow available"),
                        "400": _json(schemas.ErrorResponse, "Not a 0x address"),
                        "404": _json(schemas.ErrorResponse, "This node has no chain"),
                        "503": _json(schemas.ErrorResponse, "The chain cannot be read right now"),
                    },
                }
            },
            "/health": {"get": {"summary": "Liveness", "responses": {"200": _json(schemas.Health, "Serving")}}},
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": top["$defs"]},
    }
