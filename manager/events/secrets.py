"""Subscriptions' signing secrets: made, sealed at rest, opened to sign.

A secret must sign every request, so it cannot be hashed like a token: it is kept
encrypted with Fernet (cryptography's authenticated encryption) under the keys in
SUBSCRIPTION_KEY. The first key seals; any of them opens, so the key can be rotated
by putting a new one first. The secret itself is Standard Webhooks' form, `whsec_`
and 32 random bytes in base64, shown once when made.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from manager.errors import NotConfigured

SECRET_PREFIX = "whsec_"  # noqa: S105 - Standard Webhooks' marker, not a secret


class SecretUnreadable(Exception):
    """A sealed secret no configured key opens (the key was changed without the old)."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_key() -> str:
    """A new key for SUBSCRIPTION_KEY."""
    return Fernet.generate_key().decode()


class Sealer:
    """Seals and opens secrets under the configured keys."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys]) if keys else None

    def _keys(self) -> MultiFernet:
        if self._fernet is None:
            raise NotConfigured(
                "subscription_key_not_set",
                "SUBSCRIPTION_KEY is not set: subscriptions' secrets cannot be kept",
            )
        return self._fernet

    def seal(self, secret: str) -> str:
        return self._keys().encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        if self._fernet is None:
            raise SecretUnreadable("SUBSCRIPTION_KEY is not set")
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable("no key in SUBSCRIPTION_KEY opens this secret") from None
