"""The record-signing key: keystore round trip, clear errors that never contain key material."""

from __future__ import annotations

from pathlib import Path

import pytest

from attribution.keys import SigningKeyError, load_keystore, parse_raw_key, read_password, write_keystore

KEY = bytes(range(1, 33))


def test_keystore_round_trip_and_wrong_password(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    write_keystore(path, KEY, "correct horse")
    assert path.stat().st_mode & 0o077 == 0  # owner only
    assert load_keystore(path, "correct horse") == KEY
    with pytest.raises(SigningKeyError, match="wrong password") as info:
        load_keystore(path, "wrong")
    assert KEY.hex() not in str(info.value)


def test_bad_keystore_files(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_keystore(tmp_path / "missing.json", "x")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SigningKeyError, match="not JSON"):
        load_keystore(tmp_path / "junk.json", "x")
    (tmp_path / "other.json").write_text('{"version": 3}')
    with pytest.raises(SigningKeyError, match="not a valid V3 keystore"):
        load_keystore(tmp_path / "other.json", "x")


def test_password_sources(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    assert read_password(tmp_path / "pw", None) == "secret"
    assert read_password(None, "from-env") == "from-env"
    with pytest.raises(SigningKeyError, match="needs a password"):
        read_password(None, None)


def test_raw_keys_only_on_dev_chains() -> None:
    assert parse_raw_key("0x" + KEY.hex(), 31337) == KEY
    with pytest.raises(SigningKeyError, match="local dev chains only") as info:
        parse_raw_key(KEY.hex(), 1)
    assert KEY.hex() not in str(info.value)
    with pytest.raises(SigningKeyError, match="32 bytes of hex"):
        parse_raw_key("0x1234", 31337)
    with pytest.raises(SigningKeyError, match="32 bytes of hex"):
        parse_raw_key("zz" * 32, 31337)
