"""The adapter disk cache under faults: a disk that fills up mid-download, a download killed
mid-way, and junk CIDs. After each, the cache holds only verified adapters and /metrics counts
the fault by reason."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web
from safetensors.torch import load_file, save_file

from node.adapters.ipfs import CAR_MEDIA_TYPE, StorageError, VerifiedDownload, import_directory, partial_downloads
from node.adapters.ipfs.verifier import download_alive
from node.adapters.ipfs_source import DiskCache
from tests.api.conftest import scrape, serve_node

from .conftest import OPENLORA, PROMPT, chat, publish, serve_process

MiB = 1024 * 1024


def padded(adapter_dir: Path, dest: Path, nbytes: int, seed: int = 0) -> Path:
    """A valid adapter made `nbytes` larger by an extra file (random, so IPFS cannot dedupe it)."""
    shutil.copytree(adapter_dir, dest)
    (dest / "padding.bin").write_bytes(torch.randint(0, 256, (nbytes,), generator=torch.Generator().manual_seed(seed),
                                                     dtype=torch.uint8).numpy().tobytes())  # fmt: skip
    return dest


def with_nan(adapter_dir: Path, dest: Path) -> Path:
    """Well-formed IPFS content, a refused adapter: one weight is NaN."""
    shutil.copytree(adapter_dir, dest)
    weights = dest / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[next(iter(tensors))][0, 0] = float("nan")
    save_file(tensors, weights)
    return dest


def cached(root: Path) -> list[str]:
    """Everything in a cache directory, hidden entries included."""
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


async def post_chat(url: str, model: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        body = {"model": model, "messages": PROMPT, "max_tokens": 4}
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            return resp.status, await resp.json()


async def metric(url: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession(base_url=url) as http:
        return (await scrape(http))(name, **labels)


# -- 1. a full disk --------------------------------------------------------------------------------


def _mount_prefix(target: Path, size: str) -> list[str] | None:
    """argv prefix running a command in a mount namespace of its own with a `size` tmpfs at
    `target`; None where this machine does not allow it (no root and no user namespaces)."""
    if shutil.which("unshare") is None:
        return None
    flags = ["--mount"] if os.geteuid() == 0 else ["--mount", "--map-root-user"]
    prefix = ["unshare", *flags, "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"', str(target)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


@pytest.mark.slow
async def test_full_disk_is_a_503_counted_backed_off_and_leaves_nothing(tiny_model_dir, adapter_dir, ipfs_node,
                                                                         tmp_path):  # fmt: skip
    """The adapter cache on a real 4 MiB tmpfs; a 9 MiB adapter cannot fit."""
    cache = tmp_path / "adapters"
    cache.mkdir()
    prefix = _mount_prefix(cache, "4m")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs root or user namespaces); see the injected-ENOSPC test")
    big = await publish(ipfs_node.api_url, padded(adapter_dir, tmp_path / "big", 9 * MiB))
    small = await publish(ipfs_node.api_url, adapter_dir)
    args = ("--model", str(tiny_model_dir), "--served-model-name", "tiny", "--cache-dir", str(tmp_path),
            "--ipfs-gateway", ipfs_node.gateway_url)  # fmt: skip
    with serve_process(*args, prefix=prefix) as node:
        seen = Path(f"/proc/{node.proc.pid}/root") / cache.relative_to("/")  # the cache as the node sees it
        for attempt in range(2):  # the second one is answered from the backoff: no second download
            status, body = await post_chat(node.url, big)
            assert status == 503, body
            assert body["error"]["code"] == "adapter_unavailable"
            assert "adapter cache disk is full" in body["error"]["message"]
            assert await metric(node.url, "openlora_adapter_failures_total", reason="disk_full") == 1
            assert cached(seen) == [], attempt  # nothing half-written
        assert await chat(node.url, small)  # the disk still takes an adapter that fits
        assert cached(seen) == [small]
        assert await metric(node.url, "openlora_adapter_cache_bytes", state="partial") == 0
    assert cached(cache) == []  # the tmpfs lived in the node's namespace only


def test_injected_enospc_becomes_a_storage_error_and_leaves_nothing(adapter_dir, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the disk says ENOSPC to the first write into the cache."""
    dag = import_directory(adapter_dir)
    cache = tmp_path / "cache"
    cache.mkdir()
    pwrite = os.pwrite

    def full_disk(fd: int, data, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(cache)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(StorageError) as info:
        with VerifiedDownload(dag.root, cache / str(dag.root), max_bytes=64 * MiB) as download:
            for chunk in dag.car_chunks():
                download.feed(chunk)
            download.commit()
    assert info.value.disk_full and info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert "No space left on device" in str(info.value)
    assert cached(cache) == []


# -- 4. a download killed mid-way ------------------------------------------------------------------


def _download_then_hang(root: str, dest: Path, car: bytes, started) -> None:
    """A child process: half a download, then nothing until it is killed."""
    with VerifiedDownload(root, dest, max_bytes=64 * MiB) as download:
        download.feed(car[: len(car) // 2])
        started.set()
        time.sleep(3600)


def test_dead_processes_partial_download_is_removed_a_live_ones_counted(adapter_dir, tmp_path):
    dag = import_directory(adapter_dir)
    car = b"".join(dag.car_chunks())
    cache = tmp_path / "adapters"
    cache.mkdir()
    ctx = multiprocessing.get_context("fork")  # no re-import: the child starts in milliseconds
    started = ctx.Event()
    child = ctx.Process(target=_download_then_hang, args=(str(dag.root), cache / str(dag.root), car, started))
    child.start()
    try:
        assert started.wait(30)
        live = DiskCache(cache, max_bytes=1 << 30)
        assert live.leftovers_removed == 0 and len(partial_downloads(cache)) == 1
        assert live.stats()["partial_bytes"] > 0
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert len(partial_downloads(cache)) == 1  # what a crash leaves behind
    reopened = DiskCache(cache, max_bytes=1 << 30)
    assert reopened.leftovers_removed == 1 and cached(cache) == []
    assert reopened.stats() == {"verified_bytes": 0, "partial_bytes": 0, "leftovers_removed": 1}


@pytest.mark.slow
async def test_killed_download_is_counted_while_alive_and_cleaned_at_start(tiny_model_dir, adapter_dir, ipfs_node,
                                                                           serve_gateway, tmp_path):  # fmt: skip
    cid = await publish(ipfs_node.api_url, padded(adapter_dir, tmp_path / "big", 3 * MiB))

    async def half_then_stall(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{ipfs_node.gateway_url}/ipfs/{cid}?format=car") as upstream:
                car = await upstream.read()
        resp = web.StreamResponse(headers={"Content-Type": CAR_MEDIA_TYPE})
        await resp.prepare(request)
        await resp.write(car[: len(car) // 2])
        await asyncio.sleep(3600)
        return resp

    stalling = await serve_gateway(half_then_stall)
    cache = tmp_path / "adapters"
    old = cache / "old-adapter"  # a verified entry from earlier, least recently used
    old.mkdir(parents=True)
    (old / "w").write_bytes(bytes(MiB))
    prefetch = await asyncio.create_subprocess_exec(
        str(OPENLORA), "adapter", "prefetch", cid, "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path),
        "--ipfs-gateway", stalling, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while not (partial := partial_downloads(cache)) or DiskCache(cache, 1 << 40).partial_bytes() < MiB:
                await asyncio.sleep(0.05)
        # alive: another process opening the cache keeps it, and it counts against the size limit
        live = DiskCache(cache, max_bytes=2 * MiB)
        assert live.leftovers_removed == 0 and download_alive(partial[0])
        assert live.partial_bytes() > MiB
        assert live.trim() == ["old-adapter"]  # 1 MiB + the partial download > 2 MiB
    finally:
        prefetch.send_signal(signal.SIGKILL)
        await prefetch.wait()
    assert partial_downloads(cache) == partial and not download_alive(partial[0])  # the crash's leftover

    async with serve_node(tiny_model_dir, cache_dir=tmp_path, ipfs_gateways=[ipfs_node.gateway_url]) as node:
        assert partial_downloads(cache) == []
        assert await metric(node.url, "openlora_adapter_cache_leftovers_removed_total") == 1
        assert await chat(node.url, cid)
        assert cached(cache) == [cid]
        assert await metric(node.url, "openlora_adapter_cache_bytes", state="partial") == 0


# -- 5. junk CIDs ----------------------------------------------------------------------------------


async def test_refused_adapter_leaves_the_cache_and_never_evicts_a_good_one(tiny_model_dir, adapter_dir, ipfs_node,
                                                                             tmp_path):  # fmt: skip
    good = [await publish(ipfs_node.api_url, padded(adapter_dir, tmp_path / f"good{i}", 100_000, seed=i))
            for i in range(2)]  # fmt: skip
    junk = await publish(ipfs_node.api_url, with_nan(padded(adapter_dir, tmp_path / "junk0", 100_000, seed=9),
                                                     tmp_path / "junk"))  # fmt: skip
    one = sum(f.stat().st_size for f in (tmp_path / "good0").iterdir())
    cache = tmp_path / "cache" / "adapters"
    async with serve_node(tiny_model_dir, cache_dir=tmp_path / "cache", ipfs_gateways=[ipfs_node.gateway_url],
                          adapter_cache_bytes=int(2.5 * one)) as node:  # fmt: skip
        for cid in good:
            assert await chat(node.url, cid)
        assert cached(cache) == sorted(good)
        for attempt in range(2):
            status, body = await post_chat(node.url, junk)
            assert status == 400 and body["error"]["code"] == "adapter_invalid", body
            assert "NaN" in body["error"]["message"]
            assert cached(cache) == sorted(good), attempt  # refused: dropped, and no good one evicted
        assert node.adapters.sources[0].fetches == 3  # the refusal is remembered: no second download
        assert await metric(node.url, "openlora_adapter_failures_total", reason="non_finite") == 1
        assert node.adapters.failure_counts == {"non_finite": 1}
