"""The node's record-signing key: from an encrypted Ethereum keystore (V3 JSON) in production, a raw key
only on local dev chains. The key never appears in a log, an error message or a metric: errors name the
file and what is wrong with it, never its contents."""

from __future__ import annotations

import json
from pathlib import Path

from eth_account import Account

from attribution.errors import AttributionError

DEV_CHAIN_IDS = frozenset({31337})  # anvil / hardhat: the only chains a raw key is accepted on


class SigningKeyError(AttributionError, ValueError):
    """The signing key could not be loaded (the message never contains key material)."""


def load_keystore(path: Path, password: str) -> bytes:
    """Decrypts a V3 keystore file; wrong password and malformed files are one clear error each."""
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise SigningKeyError(f"cannot read the keystore {path}: {exc.strerror}") from None
    except ValueError:
        raise SigningKeyError(f"the keystore {path} is not JSON") from None
    try:
        return bytes(Account.decrypt(document, password))
    except ValueError as exc:
        reason = "wrong password" if "MAC mismatch" in str(exc) else "not a valid V3 keystore"
        raise SigningKeyError(f"cannot decrypt the keystore {path}: {reason}") from None
    except (KeyError, TypeError):
        raise SigningKeyError(f"cannot decrypt the keystore {path}: not a valid V3 keystore") from None


def read_password(password_file: Path | None, password: str | None) -> str:
    if password_file is not None:
        try:
            return password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise SigningKeyError(f"cannot read the password file {password_file}: {exc.strerror}") from None
    if password is None:
        raise SigningKeyError("the keystore needs a password: --node-key-password-file or OPENLORA_NODE_KEY_PASSWORD")
    return password


def parse_raw_key(raw: str, chain_id: int) -> bytes:
    """A raw hex key, accepted on dev chains only (a raw key in an env var or flag is too easy to leak)."""
    if chain_id not in DEV_CHAIN_IDS:
        raise SigningKeyError(
            f"a raw private key is accepted on local dev chains only (chain id {chain_id}); use --node-keystore"
        )
    text = raw.removeprefix("0x")
    if len(text) != 64:
        raise SigningKeyError("the raw private key must be 32 bytes of hex")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise SigningKeyError("the raw private key must be 32 bytes of hex") from None


def write_keystore(path: Path, key: bytes, password: str) -> None:
    """Encrypts `key` into a V3 keystore file readable only by its owner (devnet and operator tooling)."""
    document = Account.encrypt(key, password)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(document))
