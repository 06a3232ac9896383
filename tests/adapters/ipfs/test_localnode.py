"""The local IPFS node and the Kubo RPC client against it: publish -> fetch round trips, restarts,
CIDv0 content from Helia's own importer, and how failures are reported."""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from node.adapters.ipfs import (
    AllGatewaysFailed,
    KuboRpcClient,
    KuboRpcError,
    LocalIpfsNode,
    LocalNodeError,
    fetch_verified,
    import_directory,
    verify_car_file,
)
from node.adapters.ipfs.car import CAR_MEDIA_TYPE

from ..conftest import add_to_helia, tree_files
from .cars import build_car, car_of, split_car

MiB = 1024 * 1024


def _adapter(root: Path, seed: int) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (root / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(3 * 262144 + 99))
    (root / "README.md").write_text("# a demo adapter\n")
    return root


async def test_round_trip_survives_a_restart(tmp_path: Path) -> None:
    """import -> dag/import -> pin -> fetch as CAR -> verify -> identical; again after a restart."""
    src = _adapter(tmp_path / "adapter", seed=1)
    dag = import_directory(src)
    repo = tmp_path / "repo"
    async with LocalIpfsNode(repo) as node:
        async with KuboRpcClient(node.api_url) as ipfs:
            assert (await ipfs.version()).version
            assert [str(r) for r in await ipfs.dag_import(car_of(dag))] == [str(dag.root)]
            assert [str(p) for p in await ipfs.pin_add(dag.root)] == [str(dag.root)]
        out = await fetch_verified(dag.root, [node.gateway_url], tmp_path / "cache1", max_bytes=4 * MiB)
        assert tree_files(out) == tree_files(src)
    async with LocalIpfsNode(repo) as node:  # same repo: blocks and pins are still there
        out = await fetch_verified(dag.root, [node.gateway_url], tmp_path / "cache2", max_bytes=4 * MiB)
        assert tree_files(out) == tree_files(src)


async def test_publish_streams_a_car_file_or_chunks(ipfs_node: LocalIpfsNode, tmp_path: Path) -> None:
    dag = import_directory(_adapter(tmp_path / "adapter", seed=2))
    dag.write_car(tmp_path / "adapter.car")
    async with KuboRpcClient(ipfs_node.api_url) as ipfs:
        assert await ipfs.dag_import(tmp_path / "adapter.car", pin_roots=False) == [dag.root]
        assert await ipfs.publish(dag) == dag.root


async def test_cidv0_content_from_helias_importer_verifies(ipfs_node: LocalIpfsNode, tmp_path: Path) -> None:
    """`ipfs add` with CIDv0 (dag-pb leaves, Qm links), built by Helia, checked by our verifier."""
    files: dict[str, bytes | None] = {
        "d/small.txt": b"hello world",
        "d/big.bin": random.Random(3).randbytes(2 * 262144 + 5),
    }
    cids = await add_to_helia(ipfs_node.api_url, files, cid_version=0)
    assert cids["d/small.txt"] == "Qmf412jQZiuVUtdgnB36FXFX7xg5V6KEbSJ4dpQuhkLyfD"  # Kubo's, for "hello world"
    assert all(c.startswith("Qm") for c in cids.values())
    out = await fetch_verified(cids["d"], [ipfs_node.gateway_url], tmp_path / "cache", max_bytes=4 * MiB)
    assert tree_files(out) == {"small.txt": files["d/small.txt"], "big.bin": files["d/big.bin"]}


@pytest.mark.skipif(shutil.which("ipfs_cid") is None, reason="Debian's ipfs-cid is not installed")
@pytest.mark.parametrize("size", [11, 262144, 600_000])
async def test_helias_cidv0_equals_debians_ipfs_cid(ipfs_node: LocalIpfsNode, tmp_path: Path, size: int) -> None:
    """Another implementation's CIDv0 (`ipfs add` defaults), so the CIDv0 DAGs we verify above
    are the ones Kubo makes."""
    data = random.Random(size).randbytes(size)
    (tmp_path / "f").write_bytes(data)
    expected = json.loads(subprocess.run(["ipfs_cid", str(tmp_path / "f")], capture_output=True, check=True).stdout)
    cids = await add_to_helia(ipfs_node.api_url, {"f": data}, cid_version=0)
    assert cids["f"] == expected["CIDv0"]
    out = await fetch_verified(cids["f"], [ipfs_node.gateway_url], tmp_path / "cache", max_bytes=MiB)
    assert out.read_bytes() == data


async def test_car_in_the_nodes_own_order_with_duplicates_verifies(ipfs_node: LocalIpfsNode, tmp_path: Path) -> None:
    src = _adapter(tmp_path / "adapter", seed=4)
    (src / "copy.json").write_bytes((src / "adapter_config.json").read_bytes())
    dag = import_directory(src)
    async with KuboRpcClient(ipfs_node.api_url) as ipfs:
        await ipfs.publish(dag)
    async with aiohttp.ClientSession() as session:  # no order or dups asked: "order=unk; dups=y"
        url = f"{ipfs_node.gateway_url}/ipfs/{dag.root}?format=car"
        async with session.get(url, headers={"Accept": CAR_MEDIA_TYPE}) as resp:
            car = await resp.read()
    out = verify_car_file(io.BytesIO(car), dag.root, tmp_path / "out", max_bytes=4 * MiB)
    assert tree_files(out) == tree_files(src)


async def test_node_missing_a_block_cannot_serve_the_dag(ipfs_node: LocalIpfsNode, tmp_path: Path) -> None:
    dag = import_directory(_adapter(tmp_path / "adapter", seed=5))
    roots, sections = split_car(car_of(dag))
    async with KuboRpcClient(ipfs_node.api_url) as ipfs:
        with pytest.raises(KuboRpcError, match="could not pin"):
            await ipfs.dag_import(build_car(roots, sections[:-1]))
    with pytest.raises(AllGatewaysFailed):
        await fetch_verified(dag.root, [ipfs_node.gateway_url], tmp_path / "cache", max_bytes=4 * MiB, retries=0)
    assert list((tmp_path / "cache").iterdir()) == []


async def test_rpc_errors_are_reported(ipfs_node: LocalIpfsNode, tmp_path: Path) -> None:
    async with KuboRpcClient(ipfs_node.api_url) as ipfs:
        with pytest.raises(KuboRpcError, match="invalid CAR"):
            await ipfs.dag_import(b"this is not a CAR")
        with pytest.raises(KuboRpcError, match="pin"):
            await ipfs.pin_add("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyka")
    async with KuboRpcClient("http://127.0.0.1:9") as ipfs:
        with pytest.raises(KuboRpcError, match="cannot reach") as info:
            await ipfs.version()
        assert info.value.retryable


def test_missing_node_modules_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(LocalNodeError, match="run scripts/bootstrap.sh"):
        LocalIpfsNode(tmp_path / "repo", launcher_dir=tmp_path).start()


def test_startup_failure_shows_the_nodes_log(ipfs_node: LocalIpfsNode) -> None:
    with pytest.raises(LocalNodeError, match="in use by process"):  # one node per repo
        LocalIpfsNode(ipfs_node.repo).start()


def test_node_exits_when_its_parent_goes_away(tmp_path: Path) -> None:
    node = LocalIpfsNode(tmp_path / "repo")
    node.start()
    try:
        proc = node._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()  # what the kernel does when this process dies
        assert proc.wait(timeout=15) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the node outlived its parent's end of the pipe")
    finally:
        node.stop()
