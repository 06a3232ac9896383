"""A chain-backed node through HTTP: signed requests answered with verifiable records, and every refusal
(status, code) with nothing charged. Real anvil, real IPFS node, the real node and the dApp client library."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account
from eth_typing import URI

from attribution.caps import CapLedger
from attribution.chain import Chain
from attribution.client import OpenLoRAClient, build_chat_body
from attribution.deploy import Contracts, Deployments
from attribution.errors import NodeRefusedError, RequestBuildError
from attribution.keys import load_keystore
from attribution.signing import address_of, sign_request
from attribution.storage import State
from attribution.tokens import InputTokenCounter
from attribution.types import SECP256K1_N, Domain, InferenceRequest, Signature
from attribution.wire import REQUEST_HEADER, SIGNATURE_HEADER, prompt_hash
from node.adapters.ipfs import KuboRpcClient, import_directory
from node.adapters.synthetic import make_random_adapter
from node.api.keys import ACCOUNTANT, ADAPTERS, ENGINE
from node.api.server import start_server
from node.devnet import PAYER_DEPOSIT, LocalNetwork

pytestmark = pytest.mark.asyncio(loop_scope="module")

STRANGER_KEY = b"\x42" * 32
REGISTRY_TTL = 2.0  # the node's chain-read cache (attribution.ledger.ChainLedger's default)
MAX_STREAM = 440  # output tokens that fit the tiny model's 512 beside a short chat prompt


def payer_key(net: LocalNetwork) -> str:
    return net.provisioned.payer_key.read_text().strip()


def body(net: LocalNetwork, content: str = "Hello", model: str | None = None, max_tokens: int = 4) -> dict:
    return {
        "model": model or net.app[ENGINE].model_name,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def signed(net: LocalNetwork, payload: dict, key: str | bytes | None = None, **changes) -> tuple[dict, dict]:
    """A hand-built signed request for `payload` (the base model), valid unless `changes` say otherwise."""
    accountant = net.app[ACCOUNTANT]
    key = key or payer_key(net)
    tokens = InputTokenCounter(net.app[ENGINE].tokenizer).count(payload)
    cap = await accountant.journal.highest_cap(address_of(payer_key(net))) + 10**18
    fields = dict(
        payer=address_of(payer_key(net)), node=accountant.node, adapter_id=0, prompt_hash=prompt_hash(payload),
        input_tokens=tokens, max_tokens=payload["max_tokens"], max_charge=10**15, cumulative_cap=cap,
        deadline=int(time.time()) + 60,
    )  # fmt: skip
    domain = changes.pop("domain", accountant.domain)
    fields.update(changes)
    request = InferenceRequest(**fields)
    signature = sign_request(request, domain, key)
    return payload, {REQUEST_HEADER: json.dumps(request.to_wire()), SIGNATURE_HEADER: signature.to_hex()}


async def paid_entries(net: LocalNetwork) -> int:
    depth = await net.app[ACCOUNTANT].journal.depth()
    return sum(n for state, n in depth.items() if state is not State.FREE)


async def post(net: LocalNetwork, payload: dict, headers: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{net.url}/v1/chat/completions", json=payload, headers=headers) as response:
            return response.status, await response.json()


async def test_client_library_pays_and_verifies(net: LocalNetwork, tmp_path) -> None:
    before = await paid_entries(net)
    async with OpenLoRAClient(
        net.url, payer_key(net), tokenizer=net.settings.model, ledger=CapLedger(tmp_path / "caps.json")
    ) as client:
        for model in [*net.provisioned.adapters, net.app[ENGINE].model_name]:
            answer = await client.chat(model, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
            assert answer.record.output_tokens <= 3 and answer.record.charge > 0
            stream = client.stream_chat(model, [{"role": "user", "content": "Yo"}], max_tokens=3, temperature=0)
            text = "".join([delta async for delta in stream])
            assert stream.answer.text == text
    assert await paid_entries(net) == before + 2 * (len(net.provisioned.adapters) + 1)


async def test_a_request_signed_ahead_is_sent_once(net: LocalNetwork, tmp_path) -> None:
    """`send_signed` sends what `prepare` signed earlier; the same signature sent again is a replay the
    node refuses (409), and the client does not re-sign it behind the caller's back."""
    before = await paid_entries(net)
    async with OpenLoRAClient(
        net.url, payer_key(net), tokenizer=net.settings.model, ledger=CapLedger(tmp_path / "caps.json")
    ) as client:
        body = build_chat_body(next(iter(net.provisioned.adapters)), [{"role": "user", "content": "Hi"}], max_tokens=3)
        signed = await client.prepare(body)
        answer = await client.send_signed(signed)
        assert answer.record.request_digest == signed.request.digest(signed.domain)
        with pytest.raises(NodeRefusedError) as refused:
            await client.send_signed(signed)
        assert (refused.value.status, refused.value.code) == (409, "request_conflict")
        with pytest.raises(RequestBuildError, match="stream"):
            await client.send_signed(await client.prepare({**body, "stream": True}))
    assert await paid_entries(net) == before + 1


async def test_raw_signed_request_carries_the_record(net: LocalNetwork) -> None:
    payload, headers = await signed(net, body(net))
    status, answer = await post(net, payload, headers)
    assert status == 200, answer
    receipt = answer["openlora"]
    request = InferenceRequest.from_wire(receipt["request"])
    assert receipt["record"]["requestDigest"] == "0x" + request.digest(net.app[ACCOUNTANT].domain).hex()
    assert int(receipt["record"]["outputTokens"]) == answer["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"node": "0x" + "11" * 20}, 403, "wrong_node"),
        ({"deadline": 1}, 401, "request_expired"),
        ({"deadline": 2**40}, 422, "deadline_too_far"),
        ({"prompt_hash": b"\x01" * 32}, 422, "prompt_hash_mismatch"),
        ({"input_tokens": 1}, 422, "input_tokens_mismatch"),
        ({"adapter_id": 1}, 422, "adapter_mismatch"),
        ({"max_charge": 1}, 402, "max_charge_too_low"),
        ({"max_charge": PAYER_DEPOSIT + 1, "cumulative_cap": 10**30}, 402, "insufficient_escrow"),
        ({"max_charge": 0}, 422, "invalid_interval"),
        ({"domain": Domain(1, "0x" + "33" * 20)}, 401, "signer_not_authorized"),  # another chain's domain
    ],
    ids=[
        "wrong-node",
        "expired",
        "deadline-too-far",
        "prompt-hash",
        "input-tokens",
        "adapter",
        "max-charge",
        "escrow",
        "empty-interval",
        "other-chain",
    ],  # fmt: skip
)
async def test_refusals_charge_nothing(net: LocalNetwork, changes: dict, status: int, code: str) -> None:
    journal = net.app[ACCOUNTANT].journal
    depth = await journal.depth()
    payload, headers = await signed(net, body(net), **changes)
    got, answer = await post(net, payload, headers)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert await journal.depth() == depth


async def test_strangers_and_malformed_signatures(net: LocalNetwork) -> None:
    payload, headers = await signed(net, body(net), key=STRANGER_KEY)
    status, answer = await post(net, payload, headers)
    assert (status, answer["error"]["code"]) == (401, "signer_not_authorized")
    payload, headers = await signed(net, body(net))
    good = Signature.from_hex(headers[SIGNATURE_HEADER])
    high_s = Signature(55 - good.v, good.r, (SECP256K1_N - int.from_bytes(good.s, "big")).to_bytes(32, "big"))
    status, answer = await post(net, payload, {**headers, SIGNATURE_HEADER: high_s.to_hex()})
    assert (status, answer["error"]["code"]) == (401, "invalid_signature")
    compact = {**headers, SIGNATURE_HEADER: "0x" + good.to_bytes()[:64].hex()}
    status, answer = await post(net, payload, compact)
    assert (status, answer["error"]["code"]) == (401, "invalid_signature")
    status, answer = await post(net, payload, {})
    assert (status, answer["error"]["code"]) == (401, "signature_required")


@contextlib.asynccontextmanager
async def counted_rpc(net: LocalNetwork) -> AsyncIterator[list[dict]]:
    """Meanwhile the node's chain connection goes through a JSON-RPC proxy in front of anvil; yields the
    calls it forwarded, as they arrive."""
    provider = net.app[ACCOUNTANT].ledger.contracts.adapters.chain.w3.provider
    upstream, calls = provider.endpoint_uri, []

    async def forward(request: web.Request) -> web.Response:
        raw = await request.read()
        payload = json.loads(raw)
        calls.extend(payload if isinstance(payload, list) else [payload])
        async with http.post(upstream, data=raw, headers={"Content-Type": "application/json"}) as response:
            return web.Response(body=await response.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/", forward)
    async with aiohttp.ClientSession() as http:
        runner, url = await start_server(app, "127.0.0.1", 0)
        provider.endpoint_uri = URI(url)
        try:
            yield calls
        finally:
            provider.endpoint_uri = upstream
            await runner.cleanup()


async def test_unsigned_requests_read_nothing_on_chain(net: LocalNetwork) -> None:
    """A node that requires signatures refuses an unsigned request before it resolves the model name: a flood
    of unsigned requests naming unknown adapters costs no registry (or any other) read. The submitter's own
    loop goes on meanwhile (it reads the block time and the settlement's batches), so the reads a request
    could cause are those of the registries and the escrow, which only the request path makes."""
    contracts = net.app[ACCOUNTANT].ledger.contracts
    request_path = {c.address.lower() for c in (contracts.adapters, contracts.escrow, contracts.nodes)}

    def reads(calls: list[dict]) -> list[dict]:
        return [c for c in calls if c["method"] == "eth_call" and c["params"][0]["to"].lower() in request_path]

    async with counted_rpc(net) as calls:
        for i in range(20):
            status, answer = await post(net, body(net, model=f"flood-{i}-{time.time_ns()}"), {})
            assert (status, answer["error"]["code"]) == (401, "signature_required"), answer
        assert reads(calls) == []
        # The proxy sees the node's reads: a name looked up through the public model card reads the registry.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{net.url}/v1/models/unknown-{time.time_ns()}") as response:
                assert response.status == 404
        assert reads(calls) != []


async def test_signed_garbage_resolves_no_name(net: LocalNetwork) -> None:
    """A signed request whose checks fail without its adapter (a key the payer never authorised, a throwaway
    payer with no escrow here) is refused before the node resolves its model name: naming fresh unknown
    adapters costs no registry read, only the cached signer and escrow reads."""
    contracts = net.app[ACCOUNTANT].ledger.contracts
    registry = contracts.adapters.address.lower()

    def registry_reads(calls: list[dict]) -> list[dict]:
        return [c for c in calls if c["method"] == "eth_call" and c["params"][0]["to"].lower() == registry]

    stranger = address_of(STRANGER_KEY)
    async with counted_rpc(net) as calls:
        for i in range(10):
            payload = body(net, model=f"squat-{i}-{time.time_ns()}")
            payload, headers = await signed(net, payload, key=STRANGER_KEY)  # for the payer, by a stranger
            status, answer = await post(net, payload, headers)
            assert (status, answer["error"]["code"]) == (401, "signer_not_authorized"), answer
            payload, headers = await signed(net, payload, key=STRANGER_KEY, payer=stranger)  # its own, unfunded
            status, answer = await post(net, payload, headers)
            assert (status, answer["error"]["code"]) == (402, "insufficient_escrow"), answer
        assert registry_reads(calls) == []
        # The same request from the funded payer does resolve the name (and finds none): the proxy sees it.
        payload, headers = await signed(net, body(net, model=f"unknown-{time.time_ns()}"))
        status, answer = await post(net, payload, headers)
        assert (status, answer["error"]["code"]) == (404, "model_not_found"), answer
        assert registry_reads(calls) != []


async def test_each_payer_has_its_own_lookup_bucket(net: LocalNetwork) -> None:
    """One wei of escrow passes the precheck (maxCharge 1); such a payer naming fresh names without end is held
    to its own bucket (5/s, burst 20 on this node): 404s, then 429 with Retry-After. The funded payer and the
    public (unsigned) bucket are untouched by it."""
    accountant = net.app[ACCOUNTANT]
    deployer, flooder = Account.from_key(net.anvil.private_keys[0]), Account.from_key(net.anvil.private_keys[8])
    chain = await Chain.connect(net.anvil.rpc_url)
    try:
        c = Contracts.attach(chain, Deployments.load(net.provisioned.deployments))
        await c.token.mint(deployer, flooder.address, 1)
        await c.token.approve(flooder, c.escrow.address, 1)
        await c.escrow.deposit(flooder, accountant.node, 1)
    finally:
        await chain.close()
    statuses = []
    for i in range(30):
        payload = body(net, model=f"fresh-{i}-{time.time_ns()}")
        payload, headers = await signed(net, payload, key=flooder.key, payer=flooder.address, max_charge=1)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{net.url}/v1/chat/completions", json=payload, headers=headers) as response:
                statuses.append((response.status, (await response.json())["error"]["code"]))
                retry_after = response.headers.get("Retry-After")
        if statuses[-1][0] == 429:
            break
    assert statuses[-1] == (429, "rate_limit_exceeded") and int(retry_after) >= 1, statuses
    assert set(statuses[:-1]) == {(404, "model_not_found")} and len(statuses) >= 20, statuses
    payload, headers = await signed(net, body(net, model=f"fresh-{time.time_ns()}"))  # the funded payer
    assert (await post(net, payload, headers))[1]["error"]["code"] == "model_not_found"


async def test_replay_refused_also_after_a_restart(net: LocalNetwork) -> None:
    payload, headers = await signed(net, body(net))
    assert (await post(net, payload, headers))[0] == 200
    status, answer = await post(net, payload, headers)
    assert (status, answer["error"]["code"]) == (409, "request_conflict")
    overlapping = InferenceRequest.from_wire(json.loads(headers[REQUEST_HEADER]))
    overlapping = dataclasses.replace(overlapping, cumulative_cap=overlapping.cumulative_cap + 1)
    await net.restart()
    status, answer = await post(net, payload, headers)
    assert (status, answer["error"]["code"]) == (409, "request_conflict")
    payload, headers = await signed(net, body(net), cumulative_cap=overlapping.cumulative_cap)
    status, answer = await post(net, payload, headers)
    assert (status, answer["error"]["code"]) == (409, "request_conflict")


async def test_models_and_attribution_endpoints(net: LocalNetwork) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{net.url}/v1/models") as response:
            models = {m["id"]: m for m in (await response.json())["data"]}
        async with http.get(f"{net.url}/v1/attribution") as response:
            info = await response.json()
        payer = address_of(payer_key(net))
        async with http.get(f"{net.url}/v1/attribution/payers/{payer}") as response:
            position = await response.json()
        async with http.get(f"{net.url}/v1/attribution/payers/nope") as response:
            assert response.status == 400
    for name in net.provisioned.adapters:
        assert int(models[name]["adapterId"]) > 0 and int(models[name]["priceOut"]) > 0
    assert models[net.app[ENGINE].model_name]["adapterId"] == "0"
    assert info["node"] == net.app[ACCOUNTANT].node and int(info["nodeFeePerToken"]) > 0
    assert int(position["available"]) <= PAYER_DEPOSIT
    contracts = net.app[ACCOUNTANT].ledger.contracts  # the node registry has the address it listens on (port 0)
    assert (await contracts.nodes.node_of(net.app[ACCOUNTANT].node)).endpoint == net.url


async def test_stream_cut_midway_is_recorded_for_what_was_sent(net: LocalNetwork) -> None:
    """The client leaves after a few events: the node records (and will charge) the tokens it sent, not the
    max_tokens it was allowed, and not nothing."""
    # As many tokens as the tiny model's context allows: the node must see the client leave before it has
    # generated them all (an engine on a fast machine runs while the event loop notices the disconnect).
    payload = {**body(net, "Tell me a long story", max_tokens=MAX_STREAM), "stream": True, "ignore_eos": True}
    payload, headers = await signed(net, payload)
    request = InferenceRequest.from_wire(json.loads(headers[REQUEST_HEADER]))
    digest = request.digest(net.app[ACCOUNTANT].domain)
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{net.url}/v1/chat/completions", json=payload, headers=headers)
        assert response.status == 200
        events = 0
        async for line in response.content:
            events += line.startswith(b"data: ")
            if events == 4:
                break
        response.close()  # the client goes away mid-stream
    journal = net.app[ACCOUNTANT].journal

    async def recorded() -> bool:
        return await journal.get(digest) is not None

    deadline = time.monotonic() + 30
    while not await recorded():
        assert time.monotonic() < deadline, "no record for the cut stream"
        await asyncio.sleep(0.1)
    record = (await journal.get(digest)).usage.record
    assert 1 <= record.output_tokens < MAX_STREAM
    price = net.app[ACCOUNTANT].ledger
    terms = await price.terms(0, net.app[ACCOUNTANT].node, record.served_at)
    assert record.charge == terms.charge(request.input_tokens, record.output_tokens)[1]


async def test_no_key_in_logs_errors_or_metrics(net: LocalNetwork, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    keys = [payer_key(net).removeprefix("0x").lower()]
    keys.append(load_keystore(net.provisioned.keystore, net.provisioned.password_file.read_text().strip()).hex())
    texts = []
    for changes in ({}, {"node": "0x" + "11" * 20}, {"input_tokens": 1}):
        payload, headers = await signed(net, body(net), **changes)
        texts.append(json.dumps((await post(net, payload, headers))[1]))
    async with aiohttp.ClientSession() as http:
        for path in ("/metrics", "/v1/attribution", "/health", "/v1/models"):
            async with http.get(f"{net.url}{path}") as response:
                texts.append(await response.text())
    texts.append(caplog.text)
    texts.append(net.settings.model_dump_json())  # settings render secrets masked
    for key in keys:
        assert all(key not in text.lower() for text in texts)


async def test_registry_names_and_ids_resolve_on_chain(net: LocalNetwork, tmp_path) -> None:
    """With a chain, the AdapterRegistry is an adapter source: a name set there (in no index of the node) and
    `adapter:<id>` serve the registered CID, paid under its adapter id; the name moved to a new version serves
    the new CID once the registry cache's TTL has passed; what the registry does not know is a 404."""
    owner = Account.from_key(net.anvil.private_keys[0])
    chain = await Chain.connect(net.anvil.rpc_url)
    try:
        adapters = Contracts.attach(chain, Deployments.load(net.provisioned.deployments)).adapters
        ids, cids = [], []
        for seed in (21, 22):
            directory = tmp_path / f"version-{seed}"
            await asyncio.to_thread(make_random_adapter, Path(net.settings.model), directory, seed=seed)
            async with KuboRpcClient(net.ipfs.api_url) as client:
                cids.append(str(await client.publish(await asyncio.to_thread(import_directory, directory))))
            ids.append(await adapters.register(owner, cids[-1], bytes(32), 10**9, 10**9, [owner.address], [10_000]))
        await adapters.claim_name(owner, "registry-only", ids[0])

        async def card(name: str) -> tuple[int, dict]:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{net.url}/v1/models/{name}") as response:
                    return response.status, await response.json()

        for name in ("registry-only", f"adapter:{ids[0]}"):
            status, answer = await card(name)
            assert (status, answer["id"], answer["adapterId"]) == (200, name, str(ids[0]))
        assert (await net.app[ADAPTERS].resolve("registry-only"))[1] == cids[0]
        payload, headers = await signed(net, body(net, model="registry-only"), adapter_id=ids[0])
        status, answer = await post(net, payload, headers)
        assert status == 200 and answer["openlora"]["request"]["adapterId"] == str(ids[0])
        payload, headers = await signed(net, body(net, model="registry-only"), adapter_id=ids[1])
        status, answer = await post(net, payload, headers)  # signed for the next version: not what the name is yet
        assert (status, answer["error"]["code"]) == (422, "adapter_mismatch")
        assert f"'registry-only' (CID {cids[0]}) is adapter id {ids[0]}" in answer["error"]["message"]

        await adapters.set_name(owner, "registry-only", ids[1])  # the owner's new version
        deadline = time.monotonic() + REGISTRY_TTL + 5
        while (await card("registry-only"))[1]["adapterId"] != str(ids[1]):
            assert time.monotonic() < deadline, "the moved name was not followed after the TTL"
            await asyncio.sleep(0.2)
        assert (await net.app[ADAPTERS].resolve("registry-only"))[1] == cids[1]
        payload, headers = await signed(net, body(net, model="registry-only"), adapter_id=ids[1])
        status, answer = await post(net, payload, headers)
        assert status == 200 and answer["openlora"]["request"]["adapterId"] == str(ids[1])
        assert (await card(f"adapter:{ids[0]}"))[1]["adapterId"] == str(ids[0])  # the old version stays by id

        for unknown in ("never-registered", "adapter:999999", "adapter:0", f"adapter:{2**64}"):
            status, answer = await card(unknown)
            assert (status, answer["error"]["code"]) == (404, "model_not_found"), unknown
        payload, headers = await signed(net, body(net, model="never-registered"), adapter_id=ids[0])
        status, answer = await post(net, payload, headers)
        assert (status, answer["error"]["code"]) == (404, "model_not_found")
    finally:
        await chain.close()


async def test_a_registry_name_never_bills_another_adapter_of_the_same_content(net: LocalNetwork, tmp_path) -> None:
    """The contract takes any spelling of a CID, the node bills by the canonical one (CIDv1 base32). An adapter
    registered under another spelling (Kubo's CIDv0 `Qm...`, an `ipfs://` URL) while someone else registers the
    canonical spelling of the same content must not have its name or id served and billed to that other
    adapter: the node refuses it, clearly, and charges nothing."""
    owner, squatter = (Account.from_key(k) for k in net.anvil.private_keys[5:7])
    chain = await Chain.connect(net.anvil.rpc_url)
    try:
        adapters = Contracts.attach(chain, Deployments.load(net.provisioned.deployments)).adapters
        directory = tmp_path / "spelled"
        await asyncio.to_thread(make_random_adapter, Path(net.settings.model), directory, seed=31)
        async with KuboRpcClient(net.ipfs.api_url) as client:
            root = await client.publish(await asyncio.to_thread(import_directory, directory))
        canonical, kubo_v0 = str(root), str(root.set(version=0, base="base58btc"))
        assert kubo_v0.startswith("Qm")
        ids = {}
        for name, spelling in (("spelled-v0", kubo_v0), ("spelled-url", f"ipfs://{canonical}")):
            ids[name] = await adapters.register(owner, spelling, bytes(32), 1, 1, [owner.address], [10_000])
            await adapters.claim_name(owner, name, ids[name])
        stolen = await adapters.register(squatter, canonical, bytes(32), 10**9, 10**9, [squatter.address], [10_000])
        before = await paid_entries(net)
        for name, adapter_id in ids.items():
            for model in (name, f"adapter:{adapter_id}"):
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{net.url}/v1/models/{model}") as response:
                        status, card = response.status, await response.json()
                assert card.get("adapterId") != str(stolen), (model, card)
                assert (status, card["error"]["code"], card["error"]["param"]) == (400, "adapter_invalid", "model")
                assert f"adapter {adapter_id} is registered under" in card["error"]["message"]
                assert canonical in card["error"]["message"], card
                for signed_id in (adapter_id, stolen):
                    payload, headers = await signed(net, body(net, model=model), adapter_id=signed_id)
                    status, answer = await post(net, payload, headers)
                    assert (status, answer["error"]["code"]) == (400, "adapter_invalid"), (model, signed_id, answer)
        assert await paid_entries(net) == before
    finally:
        await chain.close()
