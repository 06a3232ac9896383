"""Typed keys for everything the app and its requests carry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from node.config import Settings

if TYPE_CHECKING:
    from attribution.accounting import Accountant  # noqa: F401 (named in a string below)
    from node.adapters.ipfs.supervisor import NodeSupervisor  # noqa: F401
    from node.adapters.manager import AdapterManager  # noqa: F401
    from node.api.lookups import LookupLimiter, PayerLookups  # noqa: F401
    from node.api.metrics import Metrics  # noqa: F401
    from node.engine import Engine  # noqa: F401

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey["Engine"]("engine")  # our engine or vLLM's (--engine)
ADAPTERS = web.AppKey["AdapterManager"]("adapters")  # absent on a node with no adapter source (base model only)
METRICS = web.AppKey["Metrics"]("metrics")
OPENAPI = web.AppKey("openapi", dict)
ACCOUNTANT = web.AppKey["Accountant"]("accountant")  # absent on a node without a chain
LOCAL_IPFS = web.AppKey["NodeSupervisor"]("local_ipfs")  # only while serve runs the local IPFS node itself
LOOKUPS = web.AppKey["LookupLimiter"]("lookups")  # bounds public lookups of new model names
PAYER_LOOKUPS = web.AppKey["PayerLookups"]("payer_lookups")  # and each payer's, in signed requests
STARTED_AT = web.AppKey("started_at", int)  # unix time the engine came up: `created` of the models

# Set by a streaming handler once its headers are sent, so that the error middleware reports a
# late failure inside the event stream instead of as a (no longer possible) error status.
STREAM_RESPONSE = web.RequestKey("stream_response", web.StreamResponse)
