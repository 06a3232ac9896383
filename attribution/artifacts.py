"""Compiled contract artifacts (ABI + creation bytecode) written by `contracts/build.js`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from eth_abi import decode
from eth_hash.auto import keccak

from attribution.errors import ContractRevert

ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "contracts" / "artifacts"

CONTRACTS = ("OpenToken", "AdapterRegistry", "NodeRegistry", "PaymentEscrow", "UsageSettlement")


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str


@cache
def load_artifact(name: str) -> Artifact:
    path = ARTIFACTS_DIR / f"{name}.json"
    data = json.loads(path.read_text())
    return Artifact(name=data["contractName"], abi=data["abi"], bytecode=data["bytecode"])


def abi_type(param: dict[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        inner = ",".join(abi_type(c) for c in param["components"])
        return f"({inner}){param['type'][5:]}"
    return param["type"]


@cache
def _error_table() -> dict[bytes, tuple[str, list[str]]]:
    table: dict[bytes, tuple[str, list[str]]] = {
        keccak(b"Error(string)")[:4]: ("Error", ["string"]),
        keccak(b"Panic(uint256)")[:4]: ("Panic", ["uint256"]),
    }
    for path in sorted(ARTIFACTS_DIR.glob("*.json")):
        if path.name == "manifest.json":
            continue
        for item in json.loads(path.read_text())["abi"]:
            if item["type"] == "error":
                types = [abi_type(p) for p in item["inputs"]]
                table[keccak(f"{item['name']}({','.join(types)})".encode())[:4]] = (item["name"], types)
    return table


def decode_revert(data: bytes | str | None) -> ContractRevert:
    """Turns revert data into a `ContractRevert` naming the custom error and its arguments."""
    if isinstance(data, str):
        data = bytes.fromhex(data.removeprefix("0x")) if data.startswith("0x") else data.encode()
    if not data or len(data) < 4:
        return ContractRevert("UnknownRevert", (), raw="0x" + (data or b"").hex())
    entry = _error_table().get(data[:4])
    if entry is None:
        return ContractRevert("UnknownRevert", (), raw="0x" + data.hex())
    name, types = entry
    return ContractRevert(name, tuple(decode(types, data[4:])), raw="0x" + data.hex())
