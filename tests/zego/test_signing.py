"""ZEGOCLOUD signature algorithms against the reference's test vectors."""

from __future__ import annotations

import re

from manager.zego.signing import (
    api_signature,
    callback_signature,
    callback_signature_matches,
    new_nonce,
)


def test_api_signature_matches_reference_vector() -> None:
    assert (
        api_signature(12345, "4fd24687296dd9f3", "9193cc662a4c0ec135ec71fb57194b38", 1615186943)
        == "43e5cfcca828314675f91b001390566a"
    )


def test_callback_signature_matches_reference_vector() -> None:
    # sorted: nonce "123412", timestamp "1470820198", secret "secret"
    assert (
        callback_signature("secret", "1470820198", "123412")
        == "5bd59fd62953a8059fb7eaba95720f66d19e4517"
    )


def test_callback_signature_sorts_as_strings_not_numbers() -> None:
    # "9" sorts after "10" as a string; a numeric sort would give another digest.
    assert callback_signature("s", "10", "9") == callback_signature("s", "9", "10")
    import hashlib

    assert callback_signature("s", "10", "9") == hashlib.sha1(b"109s").hexdigest()  # noqa: S324


def test_any_configured_secret_is_accepted() -> None:
    signature = callback_signature("old", "1470820198", "123412")
    assert callback_signature_matches(["new", "old"], "1470820198", "123412", signature)
    assert callback_signature_matches(["new", "old"], "1470820198", "123412", signature.upper())
    assert not callback_signature_matches(["new"], "1470820198", "123412", signature)
    assert not callback_signature_matches([], "1470820198", "123412", signature)
    assert not callback_signature_matches(["old"], "1470820199", "123412", signature)


def test_nonce_is_sixteen_fresh_hex_characters() -> None:
    nonces = {new_nonce() for _ in range(50)}
    assert len(nonces) == 50
    assert all(re.fullmatch(r"[0-9a-f]{16}", n) for n in nonces)
