"""Listing matches serving: `GET /v1/models/<name>` answers what a chat with that name would (a CID,
`ipfs://<cid>`, an indexed name, a local adapter), and `GET /v1/models` leaves out adapters that
would be refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import aiohttp
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from node.adapters.ipfs import import_file
from tests.api.conftest import serve_node

from .conftest import chat, publish


def _copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    cfg_file = dst / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **config}))
    return dst


def _nan(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[next(iter(tensors))][0, 0] = float("nan")
    save_file(tensors, weights)
    return dst


def _rank32(src: Path, dst: Path) -> Path:
    _copy(src, dst, r=32)
    weights = dst / "adapter_model.safetensors"
    save_file({k: torch.zeros(32, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 32)
               for k, v in load_file(weights).items()}, weights)  # fmt: skip
    return dst


async def get_model(url: str, name: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/models/{name}") as resp:
            return resp.status, await resp.json()


async def list_models(url: str) -> list[str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/models") as resp:
            assert resp.status == 200
            return [m["id"] for m in (await resp.json())["data"]]


async def test_local_adapters_that_would_be_refused_are_not_listed(tiny_model_dir, adapter_dir, tmp_path):
    root = tmp_path / "local"
    shutil.copytree(adapter_dir, root / "good")
    _copy(adapter_dir, root / "other-base", base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    _rank32(adapter_dir, root / "rank32")
    _copy(adapter_dir, root / "dora", use_dora=True)
    (root / "pickled").mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", root / "pickled")
    torch.save(load_file(adapter_dir / "adapter_model.safetensors"), root / "pickled" / "adapter_model.bin")
    _nan(adapter_dir, root / "nan")  # only loading the values finds it out
    async with serve_node(tiny_model_dir, adapters_dir=root) as node:
        assert await list_models(node.url) == ["tiny", "good", "nan"]
        for name in ("good", "other-base", "rank32", "dora", "pickled", "nan"):
            status, body = await get_model(node.url, name)
            if name == "good":
                assert status == 200 and body["id"] == "good", body
            else:  # the same answer a chat with it gets
                assert status == 400 and body["error"]["code"] == "adapter_invalid", (name, body)
                assert body["error"]["param"] == "model"
        assert await list_models(node.url) == ["tiny", "good"]  # refused once: no longer listed
        shutil.rmtree(root / "rank32")  # the operator fixes it: listed and served again
        shutil.copytree(adapter_dir, root / "rank32")
        assert await list_models(node.url) == ["tiny", "good", "rank32"]


async def test_a_cid_is_a_model_exactly_when_it_can_be_served(tiny_model_dir, adapter_dir, ipfs_node, tmp_path):
    good = await publish(ipfs_node.api_url, adapter_dir)
    junk = await publish(ipfs_node.api_url, _nan(adapter_dir, tmp_path / "junk"))
    (tmp_path / "never-published").write_bytes(os.urandom(64))
    absent = str(import_file(tmp_path / "never-published").root)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"good-name": good, "junk-name": junk}))
    async with serve_node(
        tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[ipfs_node.gateway_url], adapter_index=index
    ) as node:
        assert await list_models(node.url) == ["tiny", "good-name", "junk-name"]  # not fetched yet
        for name in (good, f"ipfs://{good}", "good-name"):
            status, body = await get_model(node.url, name)
            assert status == 200 and body["id"] == name, (name, body)
        async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0) as client:
            assert (await client.models.retrieve(f"ipfs://{good}")).id == f"ipfs://{good}"
            assert (await client.models.retrieve(good)).id == good
        assert await chat(node.url, good)
        for name, status, code in [(junk, 400, "adapter_invalid"), (absent, 404, "model_not_found"),
                                   ("bafynotacid", 404, "model_not_found")]:  # fmt: skip
            got, body = await get_model(node.url, name)
            assert (got, body["error"]["code"]) == (status, code), (name, body)
        assert await list_models(node.url) == ["tiny", "good-name"]  # the refused CID's name is gone


@pytest.mark.parametrize(
    ("name", "hint"),
    [("bafynotacid", "not a valid CID"), ("ipfs://x", "not a valid CID"),
     ("ipfs://bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy", "only dag-pb or raw blocks"),
     ("ipfs://QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco/readme", "a path inside a CID")],
)  # fmt: skip
async def test_a_malformed_or_unsupported_cid_says_why(tiny_model_dir, ipfs_node, tmp_path, name, hint):
    async with serve_node(tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[ipfs_node.gateway_url]) as node:
        async with aiohttp.ClientSession() as http:
            body = {"model": name, "messages": [{"role": "user", "content": "Hi"}]}
            async with http.post(f"{node.url}/v1/chat/completions", json=body) as resp:
                error = (await resp.json())["error"]
        assert resp.status == 404 and error["code"] == "model_not_found" and hint in error["message"], error
        status, body = await get_model(node.url, name)
        assert status == 404 and hint in body["error"]["message"]


@pytest.mark.parametrize("name", ["tiny", "nope"])
async def test_base_model_and_unknown_names(tiny_model_dir, name):
    async with serve_node(tiny_model_dir) as node:
        status, body = await get_model(node.url, name)
    if name == "tiny":
        assert status == 200 and body == {**body, "id": "tiny", "object": "model"}
    else:
        assert status == 404 and body["error"]["code"] == "model_not_found"
