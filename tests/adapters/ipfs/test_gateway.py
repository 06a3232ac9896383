"""Fetching through trustless gateways: misbehaving gateways (small aiohttp servers serving crafted
CARs, hanging or failing) are each refused with their own error and leave nothing behind; the
honest gateway is the real local IPFS node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from node.adapters.ipfs import (
    AllGatewaysFailed,
    BlockHashMismatch,
    GatewayClient,
    GatewayError,
    GatewayTimeout,
    KuboRpcClient,
    LocalIpfsNode,
    MissingBlock,
    SizeLimitExceeded,
    TruncatedCar,
    UnexpectedRoot,
    UnixfsDag,
    UnreferencedBlock,
    fetch_verified,
    import_directory,
    import_file,
    partial_downloads,
)
from node.adapters.ipfs.car import CAR_MEDIA_TYPE

from ..conftest import Handler, tree_files
from .cars import build_car, car_of, raw_cid, section, split_car

Serve = Callable[[Handler], Awaitable[str]]
MiB = 1024 * 1024


@pytest.fixture
async def published(tmp_path: Path, ipfs_node: LocalIpfsNode) -> tuple[Path, UnixfsDag]:
    """A small adapter directory, imported by us and published to the local node."""
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_bytes(b'{"r": 4}')
    (src / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 2000)
    dag = import_directory(src)
    async with KuboRpcClient(ipfs_node.api_url) as ipfs:
        await ipfs.publish(dag)
    return src, dag


def car_gateway(body: bytes, *, content_type: str = CAR_MEDIA_TYPE, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})

    return handler


def tampered(car: bytes) -> bytes:
    roots, sections = split_car(car)
    cid, block = sections[-1]
    sections[-1] = (cid, block[:-1] + bytes([block[-1] ^ 0xFF]))
    return build_car(roots, sections)


def other_root(car: bytes) -> bytes:
    _, sections = split_car(car)
    return build_car([raw_cid(b"x")], sections)


def missing(car: bytes) -> bytes:
    roots, sections = split_car(car)
    return build_car(roots, sections[:-1])


def extra(car: bytes) -> bytes:
    roots, sections = split_car(car)
    return build_car(roots, sections + [section(raw_cid(b"stray"), b"stray")])


@pytest.mark.parametrize(
    ("make_body", "error"),
    [
        (tampered, BlockHashMismatch),
        (other_root, UnexpectedRoot),
        (lambda car: car[: len(car) - 100], TruncatedCar),
        (missing, MissingBlock),
        (extra, UnreferencedBlock),
    ],
    ids=["tampered-block", "other-root", "truncated", "missing-block", "extra-block"],
)
async def test_bad_car_is_refused_and_leaves_nothing(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path, make_body: Callable, error: type
) -> None:
    _, dag = published
    url = await serve_gateway(car_gateway(make_body(car_of(dag))))
    cache = tmp_path / "cache"
    cache.mkdir()
    async with GatewayClient(url) as gateway:
        with pytest.raises(error):
            await gateway.fetch(dag.root, cache / str(dag.root), max_bytes=8 * MiB)
    with pytest.raises(AllGatewaysFailed) as info:
        await fetch_verified(dag.root, [url], cache, max_bytes=8 * MiB)
    assert [type(e) for e in info.value.errors] == [error]  # content errors are not retried
    assert not info.value.retryable
    assert list(cache.iterdir()) == []


async def test_bad_gateway_then_the_honest_node(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, ipfs_node: LocalIpfsNode, tmp_path: Path
) -> None:
    src, dag = published
    bad = await serve_gateway(car_gateway(tampered(car_of(dag))))
    out = await fetch_verified(dag.root, [bad, ipfs_node.gateway_url], tmp_path / "cache", max_bytes=8 * MiB)
    assert out == tmp_path / "cache" / str(dag.root)
    assert tree_files(out) == tree_files(src)


async def test_hanging_gateway_times_out_then_the_next_one_serves(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, ipfs_node: LocalIpfsNode, tmp_path: Path
) -> None:
    src, dag = published

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    slow = await serve_gateway(hang)
    started = time.monotonic()
    with pytest.raises(GatewayTimeout):
        await GatewayClient(slow, timeout=0.3).fetch(dag.root, tmp_path / "x", max_bytes=8 * MiB)
    # The honest node gets a timeout of its own: 0.3 s is no bound on a loaded machine's first byte.
    async with GatewayClient(slow, timeout=0.3) as hanging, GatewayClient(ipfs_node.gateway_url) as honest:
        out = await fetch_verified(dag.root, [hanging, honest], tmp_path / "cache", max_bytes=8 * MiB, retries=0)
    assert time.monotonic() - started < 60  # timed out, not waited for the hang
    assert tree_files(out) == tree_files(src)
    assert not (tmp_path / "x").exists()


async def test_gateway_that_stalls_mid_body_times_out(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path
) -> None:
    _, dag = published
    car = car_of(dag)

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": CAR_MEDIA_TYPE})
        await resp.prepare(request)
        await resp.write(car[: len(car) // 2])
        await asyncio.sleep(60)
        return resp

    url = await serve_gateway(stall)
    with pytest.raises(AllGatewaysFailed) as info:
        await fetch_verified(
            dag.root, [url], tmp_path / "cache", max_bytes=8 * MiB, timeout=0.3, retries=1, backoff=0.01
        )
    assert [type(e) for e in info.value.errors] == [GatewayTimeout, GatewayTimeout]
    assert info.value.retryable
    assert list((tmp_path / "cache").iterdir()) == []


async def test_server_errors_are_retried(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path
) -> None:
    src, dag = published
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            return web.Response(status=503, text="busy")
        return web.Response(body=car_of(dag), headers={"Content-Type": CAR_MEDIA_TYPE})

    url = await serve_gateway(flaky)
    out = await fetch_verified(dag.root, [url], tmp_path / "cache", max_bytes=8 * MiB, retries=2, backoff=0.01)
    assert calls == 3 and tree_files(out) == tree_files(src)


async def test_not_found_is_not_retried_on_the_same_gateway(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path
) -> None:
    _, dag = published
    calls = 0

    async def absent(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=404, text="not found")

    url = await serve_gateway(absent)
    with pytest.raises(AllGatewaysFailed, match="does not have"):
        await fetch_verified(dag.root, [url, url], tmp_path / "cache", max_bytes=8 * MiB, retries=3, backoff=0.01)
    assert calls == 2  # once per listed gateway


async def test_answer_that_is_not_a_car(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path
) -> None:
    _, dag = published
    url = await serve_gateway(car_gateway(b"<html>hi</html>", content_type="text/html"))
    with pytest.raises(GatewayError, match="not a CAR"):
        await GatewayClient(url).fetch(dag.root, tmp_path / "out", max_bytes=8 * MiB)


async def test_response_over_the_size_cap(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path
) -> None:
    _, dag = published
    car = car_of(dag)

    async def chunked(request: web.Request) -> web.StreamResponse:  # no Content-Length to go by
        resp = web.StreamResponse(headers={"Content-Type": CAR_MEDIA_TYPE})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(car), 4096):
            await resp.write(car[i : i + 4096])
        return resp

    announced = await serve_gateway(car_gateway(car))
    streamed = await serve_gateway(chunked)
    for url in (announced, streamed):
        with pytest.raises(SizeLimitExceeded):
            await GatewayClient(url).fetch(dag.root, tmp_path / "out", max_bytes=len(car) - 1)
        assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "adapter"]


async def test_connection_cut_mid_body(published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path) -> None:
    _, dag = published
    car = car_of(dag)

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": CAR_MEDIA_TYPE, "Content-Length": str(len(car))})
        await resp.prepare(request)
        await resp.write(car[:1000])
        assert request.transport is not None
        request.transport.close()
        return resp

    url = await serve_gateway(cut)
    with pytest.raises(GatewayError) as info:
        await GatewayClient(url).fetch(dag.root, tmp_path / "out", max_bytes=8 * MiB)
    assert info.value.retryable


async def test_unreachable_gateways_are_all_reported(published: tuple[Path, UnixfsDag], tmp_path: Path) -> None:
    _, dag = published
    dead = ["http://127.0.0.1:9", "http://127.0.0.1:1"]
    with pytest.raises(AllGatewaysFailed) as info:
        await fetch_verified(dag.root, dead, tmp_path / "cache", max_bytes=MiB, retries=0)
    assert [e.gateway for e in info.value.errors] == dead  # type: ignore[attr-defined]
    assert all(isinstance(e, GatewayError) for e in info.value.errors)
    assert str(dag.root) in str(info.value)


async def test_single_file_root(ipfs_node: LocalIpfsNode, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello world")
    dag = import_file(tmp_path / "f")
    async with KuboRpcClient(ipfs_node.api_url) as ipfs:
        await ipfs.publish(dag)
    out = await fetch_verified(str(dag.root), [ipfs_node.gateway_url], tmp_path / "cache", max_bytes=MiB)
    assert out.read_bytes() == b"hello world"
    with pytest.raises(FileExistsError):
        await fetch_verified(dag.root, [ipfs_node.gateway_url], tmp_path / "cache", max_bytes=MiB)


async def test_cancelled_fetch_leaves_nothing(
    published: tuple[Path, UnixfsDag], serve_gateway: Serve, tmp_path: Path
) -> None:
    _, dag = published
    car = car_of(dag)
    halfway = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": CAR_MEDIA_TYPE})
        await resp.prepare(request)
        await resp.write(car[: len(car) // 2])
        halfway.set()
        await asyncio.sleep(60)
        return resp

    url = await serve_gateway(stall)
    task = asyncio.create_task(fetch_verified(dag.root, [url], tmp_path / "cache", max_bytes=8 * MiB))
    await halfway.wait()
    async with asyncio.timeout(60):  # cancelled mid-download: its work directory exists
        while not partial_downloads(tmp_path / "cache"):
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list((tmp_path / "cache").iterdir()) == []
