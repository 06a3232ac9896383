"""Artifacts are up to date, the CLI deploys (and fails cleanly), the dev chain starts and stops."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.chain import Chain
from attribution.cli import main, register_cli
from attribution.deploy import NAME_COMMIT_LIFETIME, DeployConfig, Deployments, create_address, deploy_all
from attribution.devchain import Anvil
from attribution.errors import DeploymentError

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_artifacts_match_sources() -> None:
    result = subprocess.run([NODE, "contracts/build.js", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_artifacts_match_a_fresh_build() -> None:
    result = subprocess.run([NODE, "contracts/build.js", "--check", "--full"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_deploys_and_writes_deployments(anvil: Anvil, tmp_path: Path, fresh_chain) -> None:
    out = tmp_path / "deployments.json"
    status = main(["chain", "deploy", "--rpc-url", anvil.rpc_url, "--private-key", anvil.private_keys[0],
                   "--out", str(out), "--challenge-window", "100"])
    assert status == 0
    deployments = Deployments.load(out)
    assert set(deployments.contracts) == {"OpenToken", "AdapterRegistry", "NodeRegistry", "PaymentEscrow",
                                          "UsageSettlement"}
    assert deployments.chain_id == 31337 and deployments.config["challenge_window"] == 100


def test_cli_unreachable_rpc_is_one_error_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "attribution.cli", "chain", "deploy", "--rpc-url", "http://127.0.0.1:9",
         "--out", str(tmp_path / "d.json")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("openlora: error: cannot reach the chain")
    assert not (tmp_path / "d.json").exists()


def test_cli_bad_config_and_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chain", "deploy", "--thaw-period", "1", "--out", str(tmp_path / "d.json")]) == 1
    assert capsys.readouterr().err.startswith("openlora: error: thaw_period must exceed")
    with pytest.raises(SystemExit):
        main(["chain", "deploy", "--private-key", "0x1234"])


def test_register_cli_adds_chain_group() -> None:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chain", "deploy", "--out", "x.json"])
    assert args.command == "chain" and args.chain_command == "deploy" and callable(args.handler)


def test_deploy_config_validation() -> None:
    with pytest.raises(DeploymentError):
        DeployConfig(unbonding_delay=1).validate()
    with pytest.raises(DeploymentError):
        DeployConfig(slash_bps=10_001).validate()
    with pytest.raises(DeploymentError):
        Deployments.load("/nonexistent/deployments.json")
    DeployConfig(name_commit_delay=NAME_COMMIT_LIFETIME - 1).validate()  # a commitment ripens its last second
    with pytest.raises(DeploymentError, match="name_commit_delay"):
        DeployConfig(name_commit_delay=NAME_COMMIT_LIFETIME).validate()  # no commitment could ever be revealed


async def test_devchain_async_start_stop(tmp_path: Path) -> None:
    async with Anvil(accounts=2) as chain:
        assert len(chain.private_keys) == 2
        deployments = await deploy_all(chain.rpc_url, chain.private_keys[0], out=tmp_path / "d.json")
        assert json.loads((tmp_path / "d.json").read_text())["contracts"] == deployments.contracts
        connected = await Chain.connect(chain.rpc_url)
        assert connected.chain_id == 31337
        await connected.close()
        process = chain.process
    assert process is not None and process.poll() is not None  # stopped


def test_create_address_matches_anvil() -> None:
    deployer = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"  # anvil's first dev account
    assert create_address(deployer, 0) == "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    assert create_address(deployer, 1) == "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
