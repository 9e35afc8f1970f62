"""ZEGOCLOUD's two signature algorithms (zego-reference.md sections 1.3 and 6.1)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable


def api_signature(app_id: int, nonce: str, server_secret: str, timestamp: int) -> str:
    """md5(AppId + SignatureNonce + ServerSecret + Timestamp) as 32 lowercase hex."""
    return hashlib.md5(  # noqa: S324 - MD5 is ZEGOCLOUD's algorithm, not our choice
        f"{app_id}{nonce}{server_secret}{timestamp}".encode()
    ).hexdigest()


def new_nonce() -> str:
    """A fresh SignatureNonce: 8 random bytes as 16 hex characters."""
    return secrets.token_hex(8)


def callback_signature(callback_secret: str, timestamp: str, nonce: str) -> str:
    """sha1 of the lexicographically sorted secret, timestamp and nonce, joined."""
    joined = "".join(sorted([callback_secret, timestamp, nonce]))
    return hashlib.sha1(joined.encode()).hexdigest()  # noqa: S324 - ZEGOCLOUD's algorithm


def callback_signature_matches(
    secrets_: Iterable[str], timestamp: str, nonce: str, signature: str
) -> bool:
    """True when `signature` matches any configured secret, each compared in constant time."""
    given = signature.strip().lower().encode()
    matched = False
    for secret in secrets_:
        expected = callback_signature(secret, timestamp, nonce).encode()
        # No early exit: the time taken does not tell which secret (if any) matched.
        matched |= hmac.compare_digest(expected, given)
    return matched


def signed_callback(
    callback_secret: str, payload: dict[str, object], timestamp: int, nonce: str
) -> dict[str, object]:
    """A callback body as ZEGOCLOUD would send it: Timestamp and Nonce as strings, signed."""
    body = dict(payload)
    body["Timestamp"] = str(timestamp)
    body["Nonce"] = nonce
    body["Signature"] = callback_signature(callback_secret, str(timestamp), nonce)
    return body
