"""Adapter sources (one conformance suite for each) and the manager's lifecycle: shared loads,
failure with backoff and retry, the host tier's LRU with in-use adapters pinned."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from node.adapters.errors import AdapterUnavailableError, InvalidAdapterError
from node.adapters.ipfs import KuboRpcClient, import_directory
from node.adapters.ipfs_source import DiskCache, IpfsAdapterSource
from node.adapters.manager import AdapterManager, AdapterState
from node.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseModelShape
from node.adapters.sources import AdapterSource, LocalAdapterSource
from node.adapters.synthetic import make_random_adapter


@pytest.fixture(scope="module")
def adapters_root(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for i in range(4):
        make_random_adapter(tiny_model_dir, root / f"a{i}", rank=4, seed=i)
    return root


@pytest.fixture
def base(tiny_model_dir) -> BaseModelShape:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return BaseModelShape(
        "tiny", (str(tiny_model_dir),), cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], q, kv
    )


async def _ipfs_source(root: Path, ipfs_node, tmp_path: Path) -> tuple[IpfsAdapterSource, dict[str, str]]:
    cids = {}
    async with KuboRpcClient(ipfs_node.api_url) as client:
        for d in sorted(root.iterdir()):
            cids[d.name] = str(await client.publish(import_directory(d)))
    index = tmp_path / "index.json"
    index.write_text(json.dumps(cids))
    return IpfsAdapterSource([ipfs_node.gateway_url], DiskCache(tmp_path / "cache", 1 << 30), index_file=index), cids


@pytest.fixture(params=["local", "ipfs"])
async def source(request, adapters_root, tmp_path) -> AdapterSource:
    if request.param == "local":
        return LocalAdapterSource(adapters_root)
    src, _ = await _ipfs_source(adapters_root, request.getfixturevalue("ipfs_node"), tmp_path)
    return src


async def test_source_conformance(source: AdapterSource, adapters_root):
    assert source.names() == ["a0", "a1", "a2", "a3"]
    assert await source.canonical("a2") is not None
    assert await source.canonical("nope") is None and await source.canonical("../a1") is None
    path = await source.fetch("a1")
    assert (path / CONFIG_FILE).read_bytes() == (adapters_root / "a1" / CONFIG_FILE).read_bytes()
    assert (path / WEIGHTS_FILE).read_bytes() == (adapters_root / "a1" / WEIGHTS_FILE).read_bytes()


async def test_ipfs_source_fetches_each_cid_once(adapters_root, ipfs_node, tmp_path):
    source, cids = await _ipfs_source(adapters_root, ipfs_node, tmp_path)
    paths = await asyncio.gather(*(source.fetch(n) for n in ["a0", cids["a0"], f"ipfs://{cids['a0']}", "a0"]))
    assert len(set(paths)) == 1 and source.fetches == 1
    assert await source.canonical(f"ipfs://{cids['a3']}") == await source.canonical("a3") == cids["a3"]


async def test_concurrent_requests_share_one_load(adapters_root, base):
    manager = AdapterManager([LocalAdapterSource(adapters_root)], base, max_rank=8)
    adapters = await asyncio.gather(*(manager.acquire("a0") for _ in range(5)))
    assert all(a is adapters[0] for a in adapters) and manager.loads == 1
    assert await manager.state("a0") is AdapterState.LOADED
    for a in adapters:
        manager.release(a)


async def test_a_local_adapter_gone_before_its_fetch_is_a_503_without_the_path(adapters_root, tmp_path, caplog):
    """The directory vanished between resolving the name and fetching it: the client is told the adapter is
    unavailable, not where the operator keeps adapters; the log has the path."""
    root = tmp_path / "operator-only"
    shutil.copytree(adapters_root, root)
    source = LocalAdapterSource(root)
    key = await source.canonical("a1")
    shutil.rmtree(root / "a1")
    with (
        caplog.at_level(logging.WARNING, logger="node.adapters.sources"),
        pytest.raises(AdapterUnavailableError) as info,
    ):
        await source.fetch(key)
    told = info.value.client_message()
    assert (info.value.status, info.value.code) == (503, "adapter_unavailable")
    assert "'a1'" in told and "operator-only" not in told and str(tmp_path) not in told
    assert str(root / "a1") in caplog.text


async def test_failed_adapter_backs_off_then_retries(adapters_root, base, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(adapters_root / "a0", root / "bad")
    cfg_file = root / "bad" / CONFIG_FILE
    good_cfg = cfg_file.read_text()
    cfg_file.write_text("{not json")
    # The test's clock: on the wall clock, a loaded machine could pass a short backoff between two lines.
    now = [1000.0]
    manager = AdapterManager([LocalAdapterSource(root)], base, max_rank=8, retry_backoff_s=5.0, clock=lambda: now[0])
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        await manager.acquire("bad")
    assert await manager.state("bad") is AdapterState.FAILED
    cfg_file.write_text(good_cfg)  # fixed, but the backoff has not passed: same answer, no reload
    now[0] = 1004.5
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        await manager.acquire("bad")
    now[0] = 1005.0  # the backoff's end
    adapter = await manager.acquire("bad")
    assert await manager.state("bad") is AdapterState.LOADED and manager.failure_counts == {"config": 1}
    manager.release(adapter)


async def test_host_tier_evicts_lru_but_never_in_use(adapters_root, base):
    manager = AdapterManager([LocalAdapterSource(adapters_root)], base, max_rank=8, host_capacity=2)
    held = await manager.acquire("a0")  # stays in use throughout
    for name in ("a1", "a2", "a3"):
        manager.release(await manager.acquire(name))
    assert await manager.state("a0") is AdapterState.LOADED
    assert await manager.state("a3") is AdapterState.LOADED
    assert await manager.state("a1") is AdapterState.VERIFIED and await manager.state("a2") is AdapterState.VERIFIED
    assert manager.num_loaded == 2
    manager.release(held)


async def test_unknown_adapter_is_a_lookup_error(adapters_root, base):
    manager = AdapterManager([LocalAdapterSource(adapters_root)], base, max_rank=8)
    with pytest.raises(LookupError):
        await manager.acquire("missing")


async def test_host_tier_of_one_serves_a_second_adapter_while_the_first_is_held(adapters_root, base):
    """Regression: a freshly loaded adapter was evicted before its waiter took it (a reload loop)."""
    manager = AdapterManager([LocalAdapterSource(adapters_root)], base, max_rank=8, host_capacity=1)
    held = await manager.acquire("a0")
    other = await asyncio.wait_for(manager.acquire("a1"), 5)
    assert other.name == "a1" and manager.loads == 2
    manager.release(other)
    manager.release(held)


async def test_refused_cid_is_not_fetched_again_after_the_backoff(adapters_root, base, ipfs_node, tmp_path):
    """A CID's content never changes: once refused, it is refused from memory, not re-downloaded
    every time its backoff passes (a client naming junk CIDs cannot make the node fetch them over)."""
    junk = tmp_path / "junk"
    shutil.copytree(adapters_root / "a0", junk)
    cfg = json.loads((junk / CONFIG_FILE).read_text())
    (junk / CONFIG_FILE).write_text(json.dumps({**cfg, "r": 64}))  # over max_rank
    async with KuboRpcClient(ipfs_node.api_url) as client:
        cid = str(await client.publish(import_directory(junk)))
    source = IpfsAdapterSource([ipfs_node.gateway_url], DiskCache(tmp_path / "cache", 1 << 30))
    manager = AdapterManager([source], base, max_rank=8, retry_backoff_s=0.01)
    for _ in range(3):
        with pytest.raises(InvalidAdapterError, match="exceeds this node's maximum LoRA rank"):
            await manager.acquire(cid)
        await asyncio.sleep(0.05)  # past the backoff
    assert source.fetches == 1 and manager.failure_counts == {"rank": 1}
    assert not (tmp_path / "cache" / cid).exists()


async def test_only_a_content_addressed_source_gives_an_adapter_its_cid(adapters_root, base, ipfs_node, tmp_path):
    """The engine keys an adapter's prefix-cache KV by `LoraAdapter.cid`: set for what IPFS verified
    against its CID, never for a local directory; one named like a CID is no adapter at all."""
    ipfs, cids = await _ipfs_source(adapters_root, ipfs_node, tmp_path)
    local_root = tmp_path / "local"
    shutil.copytree(adapters_root / "a0", local_root / cids["a1"])  # a local adapter posing as a1's CID
    local = LocalAdapterSource(local_root)
    assert ipfs.content_addressed and not local.content_addressed
    manager = AdapterManager([ipfs], base, max_rank=8)
    fetched = await manager.acquire("a1")
    assert fetched.cid == cids["a1"] == fetched.name
    manager.release(fetched)
    manager = AdapterManager([local], base, max_rank=8)
    with pytest.raises(LookupError):
        await manager.acquire(cids["a1"])


async def test_a_local_directory_named_like_a_cid_never_stands_in_for_that_cid(
    adapters_root, ipfs_node, tmp_path, base
):
    """The handler resolves a request once and hands the engine the adapter's key (a CID for IPFS and registry
    adapters), which the manager resolves again when the engine acquires it. A local directory named like that
    CID (the local source is asked first) must not be what is loaded: a CID means the verified IPFS content,
    the one that is billed. Such directories are no local adapters at all (as such names are refused in the index)."""
    ipfs, cids = await _ipfs_source(adapters_root, ipfs_node, tmp_path)
    local_root = tmp_path / "local"
    local_root.mkdir()
    shutil.copytree(adapters_root / "a1", local_root / cids["a0"])  # other content under a0's CID
    shutil.copytree(adapters_root / "a2", local_root / "plain")
    local = LocalAdapterSource(local_root)
    assert local.names() == ["plain"] and await local.canonical(cids["a0"]) is None
    manager = AdapterManager([local, ipfs], base, max_rank=8)
    served = await manager.acquire(cids["a0"])
    reference = await AdapterManager([LocalAdapterSource(adapters_root)], base, max_rank=8).acquire("a0")
    assert served.cid == cids["a0"] and served.weights.keys() == reference.weights.keys()
    assert all(torch.equal(served.weights[k][0], reference.weights[k][0]) for k in reference.weights)
    manager.release(served)


async def test_an_adapter_reads_fetching_from_the_moment_it_is_asked_for(adapters_root, base):
    """Its entry exists from `acquire` on, its load task runs a loop turn later: meanwhile it must not read
    VERIFIED (files on local disk), which it has not been; it is being fetched."""

    class Held(LocalAdapterSource):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.go = asyncio.Event()

        async def fetch(self, key: str) -> Path:
            await self.go.wait()
            return await super().fetch(key)

    source = Held(adapters_root)
    manager = AdapterManager([source], base, max_rank=8)
    seen = []

    async def watch() -> None:
        while not seen or seen[-1] is not AdapterState.LOADED:
            seen.append(await manager.state("a0"))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    acquiring = asyncio.create_task(manager.acquire("a0"))
    for _ in range(20):
        await asyncio.sleep(0)
    source.go.set()
    manager.release(await acquiring)
    await watcher
    states = [s for s in seen if s is not None]
    assert states[0] is AdapterState.FETCHING, seen  # it read VERIFIED first: the entry's default
