"""docs/dapp.md's JavaScript example (scripts/dapp-js, viem + canonicalize) under Node: for the same key,
body and fields it must give the Python client's prompt hash, digest, signature and headers byte for byte
(both sign deterministically, RFC 6979), and it must accept an honest receipt and refuse forged ones."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from attribution.client import build_chat_body, build_completion_body, sign_body
from attribution.signing import address_of
from tests.attribution.test_client import DOMAIN, INFO, INFO_JSON, OTHER_KEY, PAYER_KEY, SIGNER_KEY
from tests.attribution.test_client import receipt_for as python_receipt

DAPP_JS = Path(__file__).resolve().parents[2] / "scripts" / "dapp-js"
FIELDS = {
    "adapterId": 7,
    "inputTokens": 31,
    "maxCharge": 10**30,
    "cumulativeCap": 3 * 10**30,
    "deadline": 1_900_000_000,
}
BODIES = [
    build_chat_body("SmolLM2-135M-Instruct", [{"role": "user", "content": "What is the capital of France?"}], max_tokens=64),
    build_chat_body("a", [{"role": "system", "content": "Tabs\tand \"quotes\" \u2028 and é 🙂 中文"},
                          {"role": "user", "content": [{"type": "text", "text": "parts"}]}],
                    max_tokens=1, stream=True, temperature=0.7, top_p=1.0, stop=["\n", "</s>"], seed=2**53 - 1),
    build_completion_body("b", [1, 2, 3], max_tokens=4294967295, temperature=1e-7),
]  # fmt: skip


def run_js(jobs: list[dict]) -> list[dict]:
    if not (DAPP_JS / "node_modules").is_dir():
        message = f"{DAPP_JS / 'node_modules'} is missing: run scripts/bootstrap.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    node = shutil.which("node")
    assert node, "Node.js is required (scripts/bootstrap.sh installs the npm packages it runs)"
    result = subprocess.run([node, "sign.js"], cwd=DAPP_JS, input=json.dumps(jobs), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def python_signed(body: dict, key: str = PAYER_KEY):
    return sign_body(body, key, info=INFO, payer=address_of(PAYER_KEY), adapter_id=FIELDS["adapterId"],
                     input_tokens=FIELDS["inputTokens"], max_charge=FIELDS["maxCharge"],
                     cumulative_cap=FIELDS["cumulativeCap"], deadline=FIELDS["deadline"])  # fmt: skip


def job(body: dict, key: str = PAYER_KEY, **extra) -> dict:
    fields = {k: str(v) for k, v in FIELDS.items()} | {"maxTokens": body["max_tokens"]}
    return {"privateKey": key, "payer": address_of(PAYER_KEY), "info": INFO_JSON, "body": body, "fields": fields,
            **extra}  # fmt: skip


def test_js_signs_exactly_as_python():
    jobs = [job(body) for body in BODIES] + [job(BODIES[0], key=SIGNER_KEY)]
    for js, (body, key) in zip(run_js(jobs), [(b, PAYER_KEY) for b in BODIES] + [(BODIES[0], SIGNER_KEY)]):
        signed = python_signed(body, key)
        assert js["promptHash"] == "0x" + signed.request.prompt_hash.hex()
        assert js["digest"] == "0x" + signed.request.digest(DOMAIN).hex()
        assert js["signature"] == signed.signature.to_hex()
        assert js["headers"] == signed.headers


def test_js_verifies_receipts_like_python():
    signed = python_signed(BODIES[0])
    text = "The capital of France is Paris."
    honest = python_receipt(signed, text=text)
    cases = {
        "honest": (honest, []),
        "wrong signer": (python_receipt(signed, text=text, key=OTHER_KEY), ["not the node's signer"]),
        "charge over": (python_receipt(signed, text=text, charge=FIELDS["maxCharge"] + 1), ["charge over maxCharge"]),
        "tokens over": (python_receipt(signed, text=text, output_tokens=65), ["outputTokens over maxTokens"]),
        "other text": (python_receipt(signed, text=text + "!"), ["responseHash"]),
        "other digest": (python_receipt(signed, text=text, request_digest=b"\x01" * 32), ["requestDigest"]),
        "other request": (dataclasses.replace(honest, request=python_signed(BODIES[2]).request), ["another request"]),
    }
    jobs = [job(BODIES[0], receipt=receipt.to_json(), text=text) for receipt, _ in cases.values()]
    for (name, (_, expected)), js in zip(cases.items(), run_js(jobs)):
        assert len(js["problems"]) == len(expected), (name, js["problems"])
        for problem, fragment in zip(js["problems"], expected):
            assert fragment in problem, (name, problem)
